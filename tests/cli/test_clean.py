"""`polyglot-jax clean` as a user runs it: flags reach the config, errors are one line, exit 2."""

import gzip
import json
import subprocess
import sys


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "polyglot_jax", "clean", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_clean_cli(tmp_path):
    docs = ["전화 010-1234-5678 로 연락 주세요", "짧은글", "같은 문서 입니다", "같은  문서 입니다"]
    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps({"body": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8"
    )
    (tmp_path / "b.txt").write_text(
        "둘째 파일의 문서\n둘째 줄\n\n같은 문서 입니다\n", encoding="utf-8"
    )
    out = tmp_path / "out"
    run = _run(
        f"--input={tmp_path / 'a.jsonl'},{tmp_path / 'b.txt'}",
        f"--output={out}",
        "--field=body",
        "--nominhash",
        "--min_chars=5",
        "--noprogress",
    )
    assert run.returncode == 0, run.stderr
    assert "docs/s" in run.stdout and "MB/s" in run.stdout
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["config"]["minhash"] is False and report["config"]["min_chars"] == 5
    assert report["rules"]["short"]["dropped"] == 1
    assert report["rules"]["exact_dedup"]["dropped"] == 2
    texts = [
        json.loads(line)["text"] for line in (out / "part-00000.jsonl").read_text().splitlines()
    ]
    assert texts == ["전화 <|tel|> 로 연락 주세요", "같은 문서 입니다", "둘째 파일의 문서\n둘째 줄"]

    again = _run(f"--input={tmp_path / 'a.jsonl'}", f"--output={out}", "--field=body")
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"polyglot-jax clean: error: output directory {out} is not empty (pass --overwrite to replace it)"
    ]
    again = _run(f"--input={tmp_path / 'a.jsonl'}", f"--output={out}", "--overwrite")
    assert again.returncode == 2  # no record has the default field `text`: nothing to clean
    assert "no document could be read" in again.stderr and "missing_field 4" in again.stderr
    assert (out / "report.json").is_file()  # the earlier output survives the refused run
    rerun = _run(
        f"--input={tmp_path / 'a.jsonl'}", f"--output={out}", "--field=body", "--overwrite"
    )
    assert rerun.returncode == 0


def test_clean_cli_usage_errors(tmp_path):
    for args, message in [
        ([f"--output={tmp_path / 'o'}"], "--input is required"),
        ([f"--input={tmp_path / 'missing.jsonl'}", f"--output={tmp_path / 'o'}"], "no such file"),
        ([f"--input={tmp_path}", f"--output={tmp_path / 'o'}", "--min_chars=-3"], "min_chars"),
        (["--input=x.jsonl", "--output=o", "--minhash_threshold=abc"], "minhash_threshold"),
    ]:
        run = _run(*args)
        assert run.returncode == 2, (args, run.stderr)
        assert message in run.stderr and "Traceback" not in run.stderr
        assert len(run.stderr.strip().splitlines()) == 1


def test_clean_cli_warns_once_per_bad_file(tmp_path):
    """A truncated .gz and a binary .txt each get one warning line on stderr naming the file; the
    run still succeeds and keeps every readable document, with two worker processes."""
    docs = [f"잘린 파일의 {i}번째 문서 입니다" for i in range(300)]
    whole = gzip.compress(
        "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode()
    )
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    junk = tmp_path / "junk.txt"
    junk.write_bytes(b"\x00\x01\x02binary\x00" * 100)
    good = tmp_path / "good.txt"
    good.write_text("멀쩡한 파일의 문서 하나\n\n멀쩡한 파일의 문서 둘\n", encoding="utf-8")
    out = tmp_path / "out"
    run = _run(f"--input={cut},{junk},{good}", f"--output={out}", "--nominhash", "--workers=2")
    assert run.returncode == 0, run.stderr
    # What a terminal shows: the progress bar redraws after "\r", so keep what follows the last.
    lines = [ln.rsplit("\r", 1)[-1] for ln in run.stderr.split("\n")]
    cut_lines = [ln for ln in lines if str(cut) in ln]
    junk_lines = [ln for ln in lines if str(junk) in ln]
    assert len(cut_lines) == 1 and len(junk_lines) == 1, run.stderr
    assert cut_lines[0].startswith("W") and junk_lines[0].startswith("W")  # absl's WARNING lines
    assert "gz stream is truncated or damaged" in cut_lines[0]
    assert "the rest of the file is lost" in cut_lines[0]
    assert "0 document(s) read, 1 bad record(s) skipped (binary 1)" in junk_lines[0]
    assert str(good) not in run.stderr
    texts = [
        json.loads(line)["text"] for line in (out / "part-00000.jsonl").read_text().splitlines()
    ]
    n = len(texts) - 2
    assert 0 < n < len(docs) and texts[:n] == docs[:n]
    assert texts[n:] == ["멀쩡한 파일의 문서 하나", "멀쩡한 파일의 문서 둘"]
    assert f"{n:,} document(s) read; then" in cut_lines[0]
