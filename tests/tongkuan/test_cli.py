"""``tongkuan`` CLI on bad input: each bad row, file or argument is one line on stderr, never a
traceback, and the other rows go on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.workers.workers_testlib import JPEG, image_bytes
from tongkuan.cli import main


@pytest.fixture
def env(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TONGKUAN_INDEX__DIR", str(tmp_path / "index"))
    monkeypatch.setenv("TONGKUAN_WORKER__EMBEDDER", "thumbnail")
    for var in ("TONGKUAN_FETCH__OBJECT_ROOT", "TONGKUAN_FETCH__LOCAL_REFS", "TONGKUAN_ENVIRONMENT"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_ingest_goes_on_past_bad_rows_with_one_line_each(env, capsys):
    shop = env / "shop"
    shop.mkdir()
    (shop / "a.jpg").write_bytes(JPEG)
    (shop / "b.png").write_bytes(image_bytes((20, 200, 20)))
    (env / "outside.jpg").write_bytes(JPEG)
    rows = [
        {"item_id": "good-a", "title": "a", "category_path": "Food/Milk", "image": "a.jpg"},
        {"item_id": "idn-path", "title": "x", "category_path": "Food/Milk", "image": "http://127.0.0.1:9/苹果.jpg?q=é"},
        {"item_id": "outside", "title": "x", "category_path": "Food/Milk", "image": "../outside.jpg"},
        {"item_id": "passwd", "title": "x", "category_path": "Food/Milk", "image": "/etc/passwd"},
        {"item_id": "file-url", "title": "x", "category_path": "Food/Milk", "image": "file:///etc/passwd"},
        {"item_id": " padded ", "title": "x", "category_path": "Food/Milk", "image": "a.jpg"},
        {"item_id": "good-b", "title": "b", "category_path": "Food/Juice", "image": "b.png"},
    ]
    catalog = shop / "catalog.jsonl"
    catalog.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n{not json\n")
    assert main(["ingest", str(catalog), "--quiet"]) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    assert out.out.splitlines()[0].startswith("indexed 2, stale 0, failed 6")
    failed = {line.split()[1].rstrip(":"): line for line in out.out.splitlines() if line.startswith("  FAILED")}
    assert "private_address" in failed["idn-path"]  # encoded and vetted like any URL, not a TypeError
    assert "outside_object_root" in failed["outside"] and "outside_object_root" in failed["passwd"]
    assert "invalid_row" in failed["file-url"] and "catalog.jsonl:8" in failed


@pytest.mark.parametrize(("argv", "message"), [
    (["search", "x.jpg", "--objects", "0"], "argument --objects: 0 is outside 1..5"),
    (["search", "x.jpg", "--objects", "many"], "argument --objects: 'many' is not a whole number"),
    (["search", "x.jpg", "--limit", "1000"], "argument --limit: 1000 is outside 1..100"),
    (["ingest", "c.jsonl", "--batch-size", "-3"], "argument --batch-size: -3 is outside 0..1024"),
    (["similar", "a", "--limit", "0"], "argument --limit: 0 is outside 1..100"),
])
def test_bad_arguments_are_one_line_usage_errors(env, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_search_refuses_a_file_over_the_cap_before_reading_it(env, capsys, monkeypatch, model_dir):
    huge = env / "huge.jpg"
    with huge.open("wb") as f:  # 300 MiB, sparse: costs no disk
        f.truncate(300 * 1024 * 1024)
    read = []
    monkeypatch.setattr(Path, "read_bytes", lambda self: read.append(self) or b"")
    monkeypatch.setenv("TONGKUAN_RUNTIME__MODEL_DIR", str(model_dir))
    monkeypatch.delenv("TONGKUAN_WORKER__EMBEDDER")
    assert main(["search", str(huge), str(env / "missing.jpg")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert read == []
    assert len(err) == 2 and "too_large" in err[0] and "missing.jpg" in err[1]


def test_an_unexpected_failure_is_one_line(env, capsys, monkeypatch):
    import tongkuan.cli as cli

    def boom(args, cfg):
        raise TypeError("unexpected")

    monkeypatch.setattr(cli, "cmd_stats", boom)
    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with(parser(), "stats", boom))
    assert main(["stats"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: TypeError: unexpected"


def _with(parser, command, func):
    for action in parser._subparsers._group_actions:  # noqa: SLF001 - rebind one sub-command
        action.choices[command].set_defaults(func=func)
    return parser


def test_train_hands_its_options_to_the_trainer_with_the_runtime_registry(env, monkeypatch, tmp_path):
    import os
    import sys

    launched = []
    monkeypatch.setattr(os, "execv", lambda exe, argv: launched.append((exe, argv)))
    assert main(["train", "--adapt", str(tmp_path), "--classes", "41-80", "--help"]) == 0
    exe, argv = launched[-1]
    assert exe == sys.executable and argv[1:4] == ["-m", "offline", "train"]
    assert argv[4:9] == ["--adapt", str(tmp_path), "--classes", "41-80", "--help"]
    assert argv[9] == "--model-dir" and Path(argv[10]).name  # the configured model dir, unless given
    main(["train", "--model-dir", "x"])
    assert launched[-1][1][4:] == ["--model-dir", "x"]


def test_train_without_torch_is_one_line(env, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert main(["train", "--epochs", "1"]) == 2
    assert "the train extra" in capsys.readouterr().err


def test_the_trainer_launched_for_real_refuses_a_missing_catalog(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "tongkuan.cli", "train", "--adapt", str(tmp_path / "missing"),
                          "--epochs", "1", "--model-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "missing" in out.stderr and "Traceback" not in out.stderr
