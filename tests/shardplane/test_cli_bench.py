"""``shardplane bench NAME [--quick] [-- BENCH_ARGS]``: what reaches the benchmark's main()."""

from __future__ import annotations

import sys
import types

import pytest

from shardplane.cli import main, parse_args


@pytest.mark.parametrize(
    ("argv", "quick", "bench_args"),
    [
        (["bench", "shard-load"], False, []),
        (["bench", "shard-load", "--quick"], True, []),
        (["bench", "--quick", "shard-load"], True, []),
        (["bench", "shard-load", "--quick", "--", "--size-gib", "4"], True, ["--size-gib", "4"]),
        (["bench", "shard-load", "--", "--size-gib", "4"], False, ["--size-gib", "4"]),
        # After "--" everything is the benchmark's, even a second "--" or its own --quick.
        (["bench", "shard-load", "--", "--quick", "--", "x"], False, ["--quick", "--", "x"]),
    ],
)
def test_bench_arguments(argv: list[str], quick: bool, bench_args: list[str]) -> None:
    args = parse_args(argv)
    assert (args.command, args.name, args.quick, args.args) == (
        "bench",
        "shard-load",
        quick,
        bench_args,
    )


def test_bench_options_without_the_separator_are_refused_with_a_hint(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(["bench", "shard-load", "--size-gib", "4"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --size-gib 4" in err
    assert "go after --" in err


def test_other_commands_still_refuse_unknown_options() -> None:
    with pytest.raises(SystemExit):
        parse_args(["models", "--quick"])
    assert parse_args(["place", "llama-3.1-8b", "--batch", "4"]).batch == 4


def test_main_hands_quick_and_only_the_bench_args_to_the_module(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[bool, list[str] | None]] = []

    def fake_main(quick: bool = False, argv: list[str] | None = None) -> int:
        calls.append((quick, argv))
        return 3

    module = types.ModuleType("shardplane.bench.fake_probe")
    module.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "shardplane.bench.fake_probe", module)
    assert main(["bench", "fake-probe", "--quick", "--", "--cases", "2"]) == 3
    assert main(["bench", "fake-probe"]) == 3
    assert calls == [(True, ["--cases", "2"]), (False, [])]
