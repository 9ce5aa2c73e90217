"""Trace files: JSON Lines batches, and the messages a bad line gets."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from warmplan.errors import UserError
from warmplan.trace import (
    TraceRequest,
    batch_index,
    batch_label,
    check_fits,
    dump_trace,
    load_trace,
    load_trace_entries,
    parse_batch,
    read_trace,
)
from warmplan.workers.base import Batch, Limits, PrefillChunk

ROOT = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "t.jsonl"
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_batches_with_defaults() -> None:
    """decode defaults to 0, prefill to none, context to 0."""
    assert parse_batch('{"decode": 7}') == Batch(decode=7)
    assert parse_batch('{"prefill": [{"tokens": 5}]}') == Batch(prefill=(PrefillChunk(5),))
    assert parse_batch(
        '{"decode": 7, "prefill": [{"tokens": 512, "context": 0}, {"tokens": 128, "context": 1024}]}'
    ) == Batch(decode=7, prefill=(PrefillChunk(512, 0), PrefillChunk(128, 1024)))


def test_blank_and_comment_lines_are_skipped_and_lines_kept(tmp_path: Path) -> None:
    """Comments and blank lines are allowed; each batch keeps its line number."""
    path = _write(tmp_path, '# header\n\n{"decode": 1}\n   # indented comment\n{"decode": 2}\n')
    entries = load_trace_entries(path)
    assert [(e.line, e.batch.decode) for e in entries] == [(3, 1), (5, 2)]
    assert load_trace(path) == [Batch(decode=1), Batch(decode=2)]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            '{"decode": 1,}',
            "invalid JSON: Expecting property name enclosed in double quotes (column 14)",
        ),
        (
            "[1, 2]",
            'expected a JSON object like {"decode": 4, "prefill": [{"tokens": 128}]}, found array [1, 2]',
        ),
        (
            '{"decodes": 4}',
            "unknown key 'decodes'; expected one of decode, prefill, step, compiles",
        ),
        ('{"decode": -1}', "field 'decode': expected a non-negative integer, found -1"),
        ('{"decode": "7"}', "field 'decode': expected a non-negative integer, found string \"7\""),
        ('{"decode": 2.5}', "field 'decode': expected a non-negative integer, found 2.5"),
        ('{"decode": true}', "field 'decode': expected a non-negative integer, found boolean true"),
        ('{"decode": NaN}', "NaN is not a number here; expected an integer"),
        ('{"decode": 1, "decode": 2}', "duplicate key 'decode'"),
        (
            '{"prefill": {"tokens": 4}}',
            "field 'prefill': expected an array of chunks, found object {\"tokens\": 4}",
        ),
        (
            '{"prefill": [4]}',
            'field \'prefill[0]\': expected an object like {"tokens": 128, "context": 0}, found 4',
        ),
        (
            '{"prefill": [{"tokens": 4, "ctx": 1}]}',
            "field 'prefill[0]': unknown key 'ctx'; expected one of tokens, context",
        ),
        (
            '{"prefill": [{"context": 4}]}',
            "field 'prefill[0].tokens': missing; expected a positive integer",
        ),
        (
            '{"prefill": [{"tokens": 1}, {"tokens": 0}]}',
            "field 'prefill[1].tokens': expected a positive integer, found 0",
        ),
        (
            '{"prefill": [{"tokens": 1, "context": -3}]}',
            "field 'prefill[0].context': expected a non-negative integer, found -3",
        ),
        ("{}", "empty batch: expected 'decode' > 0 or at least one 'prefill' chunk"),
        (
            '{"decode": 0, "prefill": []}',
            "empty batch: expected 'decode' > 0 or at least one 'prefill' chunk",
        ),
    ],
)
def test_bad_line_names_file_line_field_found_and_expected(
    tmp_path: Path, line: str, message: str
) -> None:
    """Each problem is one UserError: file:line: and what was found vs expected."""
    path = _write(tmp_path, '{"decode": 1}\n# ok so far\n' + line + "\n")
    with pytest.raises(UserError) as caught:
        load_trace(path)
    assert str(caught.value) == f"{path}:3: {message}"


def test_empty_trace_is_an_error(tmp_path: Path) -> None:
    """A trace with no batch at all says so."""
    path = _write(tmp_path, "# nothing\n\n")
    with pytest.raises(UserError, match=r"t\.jsonl: no batches: expected one JSON object a line"):
        load_trace(path)


def test_unreadable_trace_is_a_user_error(tmp_path: Path) -> None:
    """A missing file is a UserError naming it."""
    with pytest.raises(UserError, match=r"missing\.jsonl: cannot read trace"):
        load_trace(tmp_path / "missing.jsonl")


def test_check_fits_names_the_line_and_the_limit(tmp_path: Path) -> None:
    """A batch over the worker's limits fails before anything runs."""
    path = _write(tmp_path, '{"decode": 4}\n{"decode": 2, "prefill": [{"tokens": 70}]}\n')
    limits = Limits(max_num_tokens=64, max_num_batched_tokens=64, max_num_seqs=16)
    with pytest.raises(UserError) as caught:
        check_fits(load_trace_entries(path), limits, path=path)
    assert (
        str(caught.value)
        == f"{path}:2: batch of 72 tokens exceeds the worker's max_num_batched_tokens 64"
    )
    seqs = _write(tmp_path, '{"decode": 17}\n')
    with pytest.raises(
        UserError, match="batch of 17 sequences exceeds the worker's max_num_seqs 16"
    ):
        check_fits(load_trace_entries(seqs), limits, path=seqs)


def test_batch_labels_round_trip() -> None:
    """batch_label and batch_index are inverses; other labels have no index."""
    assert batch_label(12) == "batch[12]"
    assert batch_index("batch[12]") == 12
    assert batch_index("slot-mapping") is None
    assert batch_index(None) is None


_chunks = st.lists(
    st.builds(PrefillChunk, st.integers(1, 4096), st.integers(0, 4096)), max_size=4
).map(tuple)
_batches = st.builds(Batch, decode=st.integers(0, 256), prefill=_chunks).filter(
    lambda b: b.num_tokens > 0
)


@given(st.lists(_batches, min_size=1, max_size=8))
def test_dump_and_load_round_trip(batches: list[Batch]) -> None:
    """dump_trace writes what load_trace reads back."""
    text = dump_trace(batches)
    assert [parse_batch(line) for line in text.splitlines()] == batches


@pytest.mark.parametrize("name", ["chat", "long-prompt", "decode"])
def test_shipped_traces_load_and_fit_the_builtin_plan_sizes(name: str) -> None:
    """Shipped traces: <= 512 tokens and <= 64 sequences a batch, context + tokens <= 4096."""
    entries = load_trace_entries(ROOT / "traces" / f"{name}.jsonl")
    assert len(entries) >= 20
    limits = Limits(max_num_tokens=512, max_num_batched_tokens=512, max_num_seqs=64)
    check_fits(entries, limits, path=name)
    assert all(c.tokens + c.context <= 4096 for e in entries for c in e.batch.prefill)
    assert all(e.batch.decode <= 64 for e in entries)


def test_shipped_traces_have_their_character() -> None:
    """decode.jsonl is pure decode; long-prompt.jsonl chunks with prior context; chat mixes."""
    decode = load_trace(ROOT / "traces" / "decode.jsonl")
    assert all(not b.prefill for b in decode)
    assert len({b.decode for b in decode}) >= 16
    long = load_trace(ROOT / "traces" / "long-prompt.jsonl")
    assert any(c.context >= 1024 for b in long for c in b.prefill)
    assert any(b.num_tokens == 512 for b in long)
    chat = load_trace(ROOT / "traces" / "chat.jsonl")
    decode_only = sum(1 for b in chat if not b.prefill)
    assert decode_only > len(chat) / 2
    assert any(b.decode and b.prefill for b in chat)


# -- request-level traces -------------------------------------------------------------


def test_request_lines_read_with_defaults(tmp_path: Path) -> None:
    """A request: prompt and output required; hit 0, arrival unset, id from the line."""
    path = _write(
        tmp_path,
        '# requests\n{"prompt_tokens": 90, "output_tokens": 4}\n'
        '{"id": "b", "arrival_s": 0.5, "prompt_tokens": 900, "cached_tokens": 512, "output_tokens": 1}\n',
    )
    trace = read_trace(path)
    assert trace.kind == "requests" and trace.batches == ()
    assert trace.requests == (
        TraceRequest(line=2, id="line-2", prompt_tokens=90, output_tokens=4),
        TraceRequest(
            line=3, id="b", prompt_tokens=900, output_tokens=1, cached_tokens=512, arrival_s=0.5
        ),
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            '{"prompt_tokens": -5, "output_tokens": 4}',
            "field 'prompt_tokens': expected a positive integer, found -5",
        ),
        (
            '{"prompt_tokens": 5, "output_tokens": 0}',
            "field 'output_tokens': expected a positive integer, found 0",
        ),
        ('{"prompt_tokens": 5}', "field 'output_tokens': missing; expected a positive integer"),
        (
            '{"prompt_tokens": 5, "output_tokens": 1, "cached_tokens": 6}',
            "field 'cached_tokens': a prefix-cache hit of 6 tokens is longer than the prompt "
            "(5 tokens); expected 0 <= cached_tokens <= prompt_tokens",
        ),
        (
            '{"prompt_tokens": 5, "output_tokens": 1, "arrival_step": 1, "arrival_s": 0.1}',
            "fields 'arrival_step' and 'arrival_s': expected one of them, found both",
        ),
        (
            '{"prompt_tokens": 5, "output_tokens": 1, "arrival_s": -1}',
            "field 'arrival_s': expected a non-negative number, found -1",
        ),
        (
            '{"prompt_tokens": 5, "output_tokens": 1, "prompt": 5}',
            "unknown key 'prompt'; expected one of id, arrival_step, arrival_s, prompt_tokens, "
            "cached_tokens, output_tokens",
        ),
        (
            '{"decode": 1}',
            "a batch in a trace of requests (from line 1); a trace holds batches or requests, not both",
        ),
    ],
)
def test_bad_request_line_names_file_line_and_field(
    tmp_path: Path, line: str, message: str
) -> None:
    """Each problem of a request line is one UserError at file:line."""
    path = _write(tmp_path, '{"prompt_tokens": 5, "output_tokens": 1}\n# ok\n' + line + "\n")
    with pytest.raises(UserError) as caught:
        read_trace(path)
    assert str(caught.value) == f"{path}:3: {message}"


def test_load_trace_entries_refuses_a_request_level_trace(tmp_path: Path) -> None:
    """Code that wants batches is told the trace holds requests."""
    path = _write(tmp_path, '{"prompt_tokens": 5, "output_tokens": 1}\n')
    with pytest.raises(UserError, match=r"t\.jsonl:1: a request-level trace; expected batches"):
        load_trace_entries(path)


def test_recorded_compiles_are_checked(tmp_path: Path) -> None:
    """A recorded line's compiles are objects with kind, name and key strings."""
    path = _write(
        tmp_path,
        '{"decode": 1, "step": 0, "compiles": [{"kind": "dynamo", "name": 3, "key": ""}]}\n',
    )
    with pytest.raises(UserError) as caught:
        read_trace(path)
    assert str(caught.value) == f"{path}:1: field 'compiles[0].name': expected a string, found 3"
