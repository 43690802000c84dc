"""Clean raw text into jsonl shards: PII masks, HTML/code/repeat/short filters, exact + near dedup.

    polyglot-jax clean --input=PATH,... --output=DIR [--workers=N] [--nominhash] [--min_chars=20]

Inputs: .txt (documents separated by blank lines) or .jsonl (`--field`, default `text`), each
optionally .gz/.zst; directories and glob patterns expand to such files. Writes
`DIR/part-NNNNN.jsonl` (`{"text": ...}` per line, `--shard_docs` per shard) and `DIR/report.json`
(counts per rule with a few examples, skipped records by reason, throughput). DIR must be empty
or absent unless `--overwrite`; it appears only when complete.

Rules are boolean flags, all on by default; switch one off absl-style with `--no<rule>`:
`--noempty --nobroken_code --nohtml --norepeats --nopii_rrn --nopii_acc --nopii_tel --nospaces
--noshort --noexact_dedup --nominhash`. Each rule's parameters are flags of their own
(`--max_code_share`, `--max_char_repeat`, `--max_repeat_share`, `--max_blank_lines`,
`--min_chars`, `--minhash_threshold`, `--minhash_ngram`, ...; see --help).
"""

from __future__ import annotations

import dataclasses

from absl import flags

from polyglot_jax.data.clean import RULES, CleanConfig, clean_files
from polyglot_jax.errors import ConfigError

_INPUT = flags.DEFINE_list("input", None, "Inputs: .txt/.jsonl[.gz|.zst] files, dirs or globs.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the shards and report.json.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing, non-empty --output.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")

_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float}
_CONFIG_FLAGS = {
    f.name: _DEFINE.get(type(f.default), flags.DEFINE_string)(f.name, f.default, f.metadata["help"])
    for f in dataclasses.fields(CleanConfig)
}


def main(argv: list[str]) -> int | None:
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}; flags look like --name=value")
    if not _INPUT.value:
        raise ConfigError("--input is required (comma-separated files, directories or globs)")
    if not _OUTPUT.value:
        raise ConfigError("--output is required")
    config = CleanConfig(**{name: flag.value for name, flag in _CONFIG_FLAGS.items()})
    report = clean_files(
        _INPUT.value, _OUTPUT.value, config, overwrite=_OVERWRITE.value, progress=_PROGRESS.value
    )
    docs, rules = report["documents"], report["rules"]
    for rule in RULES:
        entry = rules[rule]
        if entry["enabled"]:
            counts = ", ".join(
                f"{k} {v:,}"
                for k, v in entry.items()
                if isinstance(v, int) and not isinstance(v, bool)
            )
            print(f"  {rule:<12} {counts}")
    if report["skipped"]["counts"]:
        bad = ", ".join(f"{k} {v:,}" for k, v in report["skipped"]["counts"].items())
        print(f"  {'skipped':<12} {bad}")
    print(
        f"clean: {docs['read']:,} documents ({report['bytes']['in'] / 1e6:,.1f} MB) in "
        f"{report['seconds']:,.1f} s: {report['docs_per_s']:,.0f} docs/s, "
        f"{report['mb_per_s']:,.2f} MB/s with {report['workers']} worker(s); kept "
        f"{docs['kept']:,} in {len(report['output_shards'])} shard(s) -> {_OUTPUT.value}"
    )
    return 0
