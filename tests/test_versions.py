"""Each component's version matches its code (bench/versions.json); see bench/versions.py."""
import copy

import pytest

from bench import versions


@pytest.fixture(scope="module")
def now():
    return versions.current()


def test_every_components_version_matches_its_code(now):
    assert versions.problems(now=now) == [], "\n".join(versions.problems(now=now))


def test_a_code_change_under_the_same_version_is_caught(now):
    recorded = copy.deepcopy(now)
    recorded["defense/abl"]["code"] = "0" * 16
    recorded["attack/badnet"]["version"] += 1
    del recorded["defense/dbr"]
    recorded["defense/gone"] = {"version": 1, "code": "x", "files": []}
    found = versions.problems(recorded, now)
    assert len(found) == 4
    assert "defense/abl: its code (defenses/abl.py) changed but its version is still 3" in found[1]
    assert found[0].startswith("attack/badnet: version 1 is not the recorded 2")
    assert found[2].startswith("defense/dbr: not in versions.json")
    assert found[3].startswith("defense/gone: recorded but no longer registered")


def test_update_refuses_changed_code_under_an_unchanged_version(now, tmp_path, monkeypatch):
    manifest = tmp_path / "versions.json"
    monkeypatch.setattr(versions, "MANIFEST", manifest)
    recorded = copy.deepcopy(now)
    recorded["defense/cutmix"]["code"] = "f" * 16
    manifest.write_text(__import__("json").dumps(recorded))
    refused = versions.update()
    assert refused and "defense/cutmix" in refused[0] and versions.load() == recorded  # nothing written
    assert versions.update(same_results=True) == [] and versions.load() == now


def test_the_hash_ignores_docstrings_and_comments_but_not_code(tmp_path):
    a, b, c = (tmp_path / n for n in ("a.py", "b.py", "c.py"))
    a.write_text('"""Module."""\ndef f(x):\n    """Doc."""\n    return x + 1\n')
    b.write_text('def f(x):  # a comment\n    return x + 1\n')
    c.write_text('def f(x):\n    return x + 2\n')
    # the file name enters the hash, so compare files of one name
    b2 = tmp_path / "sub"
    b2.mkdir()
    (b2 / "a.py").write_text(b.read_text())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.py").write_text(c.read_text())
    assert versions.code_hash([a]) == versions.code_hash([b2 / "a.py"])
    assert versions.code_hash([a]) != versions.code_hash([tmp_path / "other" / "a.py"])
