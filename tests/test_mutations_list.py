"""The mutation list of tests/mutations.py stays in step with the code: every pattern occurs exactly
once in its file (the mutation run itself is slow and not part of the default run)."""

import importlib.util
import sys
from pathlib import Path


def load_mutations():
    path = Path(__file__).with_name("mutations.py")
    spec = importlib.util.spec_from_file_location("vk_mutations", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_every_mutation_pattern_matches_exactly_once():
    mod = load_mutations()
    assert len(mod.MUTATIONS) >= 25
    assert mod.check_patterns(mod.ROOT, mod.MUTATIONS) == []
    assert len({m.name for m in mod.MUTATIONS}) == len(mod.MUTATIONS)
    for m in mod.MUTATIONS:
        assert m.old != m.new and m.tests, m.name


def test_a_pattern_that_does_not_match_once_is_reported(tmp_path):
    mod = load_mutations()
    (tmp_path / "k.py").write_text("a = 1\na = 1\n")
    twice = mod.Mutation("twice", "k.py", "a = 1\n", "a = 2\n", ("tests",))
    missing = mod.Mutation("missing", "k.py", "b = 1\n", "b = 2\n", ("tests",))
    errors = mod.check_patterns(tmp_path, [twice, missing])
    assert errors == ["twice: pattern occurs 2 times in k.py", "missing: pattern occurs 0 times in k.py"]
