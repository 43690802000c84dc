"""The cleaning pipeline end to end on constructed inputs whose counts are known by construction."""

import gzip
import json
import os
import unicodedata

import numpy as np
import pytest
import zstandard

from polyglot_jax.data.clean import RULES, CleanConfig, RuleStats, clean_files, clean_text
from polyglot_jax.data.sources import iter_texts, list_input_files
from polyglot_jax.errors import ConfigError, InputError


def _korean(rng: np.random.Generator, chars: int) -> str:
    words, left = [], chars
    while left > 0:
        n = min(left, int(rng.integers(2, 6)))
        words.append("".join(chr(c) for c in rng.integers(0xAC00, 0xD7A4, n)))
        left -= n
    return " ".join(words)


def _outputs(directory) -> list[str]:
    return [t for f in list_input_files([directory]) for t in iter_texts(f)]


def _report(directory) -> dict:
    return json.loads((directory / "report.json").read_text(encoding="utf-8"))


def test_clean_text_rules_in_order():
    config = CleanConfig()
    raw = (
        "<p>제목:  오늘의   영화</p>\n"
        "<p>ㅋㅋㅋㅋㅋㅋㅋ 정말   재밌었어요!!!!!!</p>\n\n\n\n"
        "<p>문의는 010-1234-5678 로 &amp; 계좌는 신한 110-123-456789 입니다</p>"
    )
    expected = (
        "제목: 오늘의 영화\n\n"
        "ㅋㅋㅋ 정말 재밌었어요!!!\n\n"
        "문의는 <|tel|> 로 & 계좌는 신한 <|acc|> 입니다"
    )
    assert clean_text(raw, config) == expected


def test_newlines_survive_cleaning(tmp_path):
    # .txt: blank lines separate documents, so a document there has lines but no paragraphs.
    lines = "첫째 줄입니다\n  들여쓴 둘째 줄  \n셋째 줄\t끝"
    lines_want = "첫째 줄입니다\n들여쓴 둘째 줄\n셋째 줄 끝"
    paragraphs = "첫 문단 첫 줄\n첫 문단 둘째 줄\n\n\n\n둘째 문단 \n\n셋째 문단의 줄"
    paragraphs_want = "첫 문단 첫 줄\n첫 문단 둘째 줄\n\n둘째 문단\n\n셋째 문단의 줄"
    (tmp_path / "in.txt").write_text(lines + "\n\n\n" + lines.replace("첫째", "1") + "\n")
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": paragraphs}) + "\n")
    config = CleanConfig(minhash=False)
    clean_files([tmp_path / "in.txt", tmp_path / "in.jsonl"], tmp_path / "out", config)
    assert _outputs(tmp_path / "out") == [
        lines_want,
        lines_want.replace("첫째", "1"),
        paragraphs_want,
    ]


def test_per_rule_switches():
    text = "연락처 010-1234-5678   <b>ㅋㅋㅋㅋㅋ</b>"
    assert clean_text(text, CleanConfig()) == "연락처 <|tel|> ㅋㅋㅋ"
    assert clean_text(text, CleanConfig(pii_tel=False)) == "연락처 010-1234-5678 ㅋㅋㅋ"
    assert clean_text(text, CleanConfig(html=False)) == "연락처 <|tel|> <b>ㅋㅋㅋ</b>"
    assert clean_text(text, CleanConfig(repeats=False)) == "연락처 <|tel|> ㅋㅋㅋㅋㅋ"
    assert clean_text(text, CleanConfig(spaces=False)) == "연락처 <|tel|>   ㅋㅋㅋ"
    assert clean_text("짧다", CleanConfig()) is None
    assert clean_text("짧다", CleanConfig(short=False)) == "짧다"
    assert clean_text("짧다", CleanConfig(min_chars=2)) == "짧다"
    assert clean_text("   ", CleanConfig(short=False)) is None
    assert clean_text("ㅋ" * 40, CleanConfig()) is None
    assert clean_text("ㅋ" * 40, CleanConfig(repeats=False)) == "ㅋ" * 40
    stats = RuleStats(examples=1)
    assert clean_text(";" * 80, CleanConfig(), stats) is None
    assert stats.counts["repeats"]["dropped"] == 1 and stats.counts["broken_code"]["dropped"] == 0
    code = "var a = 1;\nvar b = 2;\nfunction f() {\n  return a + b;\n}"
    assert clean_text(code, CleanConfig()) is None
    assert clean_text(code, CleanConfig(broken_code=False)) is not None


ADVERSARIAL_UNITS = ["<!--", "<script>", "<p ", "<a href='", "[a](", "a  ", "if (", "x = (",
                     "010 ", "1-", "900101-", "은행 1", "ㅋㅎ", "대박 ", "&#", "|-"]  # fmt: skip


@pytest.mark.parametrize("unit", ADVERSARIAL_UNITS)
def test_no_quadratic_blowup_on_adversarial_text(unit):
    """100 kB of one repeated pattern (one line, then 50-unit lines): linear time, well under 1 s
    (the lazy-regex versions of these rules took 20-40 s on `<!--` and `<script>`)."""
    import time

    for text in (unit * (100_000 // len(unit)), (unit * 50 + "\n") * (2000 // len(unit) + 1)):
        start = time.perf_counter()
        clean_text(text, CleanConfig())
        clean_text(text, CleanConfig(repeats=False, broken_code=False))
        assert time.perf_counter() - start < 1.0


def _write_gz(path, records):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")


def test_dedup_counts_on_constructed_duplicates(tmp_path):
    """40 unique long documents; 15 exact copies (respaced, re-cased, NFD) across the two inputs;
    10 near copies (3 characters changed); 5 too short; bad records of every kind."""
    rng = np.random.default_rng(0)
    unique = [_korean(rng, 400) + f" Doc{i}" for i in range(40)]
    exact = [unique[i].replace(" ", "  ") for i in range(5)]
    exact += [unique[i].replace("Doc", "DOC") for i in range(5, 10)]
    exact += [unicodedata.normalize("NFD", unique[i]) for i in range(10, 15)]
    near = []
    for i in range(15, 25):
        chars = list(unique[i])
        for j in (50, 150, 250):
            chars[j] = "힣" if chars[j] != "힣" else "가"
        near.append("".join(chars))
    short = ["짧은 글", "ㅋㅋ", "네", "좋아요", "최고"]
    first = unique[:20] + exact[:8] + short
    second = unique[20:] + exact[8:] + near
    _write_gz(
        tmp_path / "a.jsonl.gz",
        [{"text": t} for t in first] + ["not json", '{"body": 1}', '{"text": null}'],
    )
    (tmp_path / "b.txt.zst").write_bytes(
        zstandard.ZstdCompressor().compress(("\n\n".join(second) + "\n\n\x00bin\n").encode())
    )
    report = clean_files(
        [tmp_path / "a.jsonl.gz", tmp_path / "b.txt.zst"], tmp_path / "out", CleanConfig()
    )
    assert report == _report(tmp_path / "out")
    rules = report["rules"]
    assert rules["exact_dedup"]["dropped"] == 15
    assert rules["minhash"]["dropped"] == 10
    assert rules["short"]["dropped"] == 5
    assert report["skipped"]["counts"] == {
        "binary": 1,
        "field_not_string": 1,
        "missing_field": 1,
        "not_json": 1,
    }
    docs = report["documents"]
    assert docs == {"read": 74, "skipped": 4, "dropped": 30, "kept": 40}
    assert _outputs(tmp_path / "out") == unique[:20] + unique[20:]
    assert all(len(v["examples"]) <= 3 for v in rules.values())
    assert set(rules) == set(RULES)

    # Off switches: the same input with no dedup keeps every copy.
    config = CleanConfig(exact_dedup=False, minhash=False)
    report = clean_files([tmp_path / "a.jsonl.gz", tmp_path / "b.txt.zst"], tmp_path / "o2", config)
    assert report["documents"]["kept"] == 65
    assert report["rules"]["exact_dedup"] == {"enabled": False, "dropped": 0, "examples": []}
    # Exact dedup alone catches the exact copies, not the near ones.
    config = CleanConfig(minhash=False)
    report = clean_files([tmp_path / "a.jsonl.gz", tmp_path / "b.txt.zst"], tmp_path / "o3", config)
    assert report["rules"]["exact_dedup"]["dropped"] == 15 and report["documents"]["kept"] == 50


def test_report_examples_never_hold_pii(tmp_path):
    docs = [f"{i}번 문의 010-1234-{5000 + i} 입니다. 감사합니다 여러분" for i in range(5)]
    docs += ["900101-1234567", "<div><a href='/x'>010-9999-8888</a></div>" * 3]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    report = clean_files([tmp_path / "a.jsonl"], tmp_path / "out", CleanConfig(min_chars=15))
    assert report["rules"]["pii_tel"] == {
        "enabled": True,
        "changed": 5,
        "masked": 5,
        "examples": report["rules"]["pii_tel"]["examples"],
    }
    text = (tmp_path / "out" / "report.json").read_text()
    assert "010-" not in text and "1234567" not in text and "<|tel|>" in text


def test_shards_and_output_dir_handling(tmp_path):
    rng = np.random.default_rng(1)
    docs = [_korean(rng, 50) for _ in range(25)]
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    out = tmp_path / "out"
    report = clean_files([src], out, CleanConfig(shard_docs=10))
    assert report["output_shards"] == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]
    assert sorted(os.listdir(out)) == [*report["output_shards"], "report.json"]
    assert out.stat().st_mode & 0o777 == (tmp_path / "a.jsonl").stat().st_mode & 0o777 | 0o111
    lines = [(out / s).read_text().splitlines() for s in report["output_shards"]]
    assert [len(x) for x in lines] == [10, 10, 5]
    assert [json.loads(x) for shard in lines for x in shard] == [{"text": d} for d in docs]

    with pytest.raises(InputError, match="not empty"):
        clean_files([src], out, CleanConfig())
    clean_files([src], out, CleanConfig(shard_docs=100), overwrite=True)
    assert sorted(os.listdir(out)) == ["part-00000.jsonl", "report.json"]
    empty = tmp_path / "empty"
    empty.mkdir()
    clean_files([src], empty, CleanConfig())  # an existing empty directory is fine
    with pytest.raises(InputError, match="no such file"):
        clean_files([tmp_path / "missing.jsonl"], tmp_path / "o4", CleanConfig())
    with pytest.raises(ConfigError, match="min_chars"):
        clean_files([src], tmp_path / "o5", CleanConfig(min_chars=-1))
    with pytest.raises(ConfigError, match="minhash_threshold=1.0 with minhash_num_perm=128"):
        clean_files([src], tmp_path / "o6", CleanConfig(minhash_threshold=1.0))
    # Nothing half-written is left beside the outputs.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "empty", "out"]


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"text": f"문서 번호 {i} 입니다"}) + "\n" for i in range(50)))
    import polyglot_jax.data.clean as clean_module

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(clean_module._ShardWriter, "close", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        clean_files([src], tmp_path / "out", CleanConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]


def test_two_workers_match_one(tmp_path):
    rng = np.random.default_rng(3)
    docs = [_korean(rng, int(n)) for n in rng.integers(20, 200, 1200)]
    docs += docs[::7]  # exact duplicates far apart, across batches
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    one = clean_files([src], tmp_path / "one", CleanConfig(workers=1))
    two = clean_files([src], tmp_path / "two", CleanConfig(workers=2))
    assert _outputs(tmp_path / "one") == _outputs(tmp_path / "two")
    assert one["rules"] == two["rules"] and one["documents"] == two["documents"]
    assert two["workers"] == 2 and one["rules"]["exact_dedup"]["dropped"] == 172


def test_nsmc_sample(shared_data, tmp_path):
    """Real noisy reviews: invariants checked independently of the pipeline's own code."""
    src = shared_data / "nsmc" / "reviews.jsonl.gz"
    with gzip.open(src, "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(5000)]
    (tmp_path / "nsmc.jsonl").write_text("".join(lines), encoding="utf-8")
    report = clean_files([tmp_path / "nsmc.jsonl"], tmp_path / "out", CleanConfig())
    out = _outputs(tmp_path / "out")
    docs = report["documents"]
    assert docs["read"] == 5000 and docs["skipped"] + docs["dropped"] + docs["kept"] == 5000
    assert len(out) == docs["kept"] > 4000
    assert all(len(t) >= 10 and t == t.strip() and "  " not in t for t in out)
    assert len({" ".join(t.casefold().split()) for t in out}) == len(out)
    assert not any("ㅋㅋㅋㅋ" in t or "!!!!" in t for t in out)
    dropped = sum(v.get("dropped", 0) for v in report["rules"].values())
    assert dropped == docs["dropped"]
