"""``python -m api.batch INPUT OUTPUT``: many texts through the model, in this process.

Files are checked (formats, columns, duplicate ids, what OUTPUT already holds) before the
model loads, so a mistake costs a second, not a model load. The model comes from the usual
``THAI_*`` settings through :func:`api.engine.build_engine`: the same model, adapter and (with
``THAI_ENGINE=openai``) upstreams the server would use.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from api.batch.formats import (
    BatchUsageError,
    CsvSink,
    JsonlInput,
    JsonlSink,
    Resume,
    TableInput,
    XlsxSink,
    file_format,
    unique_keys,
)
from api.batch.runner import BatchAborted, run_batch
from api.protocol_summarize import SummarizeRequest
from api.settings import ModelSettings, describe_validation_error

EXIT_OK, EXIT_ROWS_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}

EPILOG = """\
formats:
  INPUT  .jsonl  OpenAI batch input: one {"custom_id", "method": "POST", "url", "body"} per
                 line; url /v1/chat/completions or /v1/summarize, body as the HTTP API takes it
         .csv .xlsx  a header row, then one text per row (each a /v1/summarize request);
                 .csv must be UTF-8 (Excel: Save As "CSV UTF-8"); .xlsx: the first sheet
  OUTPUT .jsonl  vLLM run-batch lines: {"id", "custom_id", "response": {"status_code",
                 "request_id", "body"}, "error"}, in the order rows finish
         .csv    row, the input columns, summary, error; in the order rows finish
         .xlsx   the same, in input order; written at the end (and on Ctrl-C) from
                 OUTPUT.progress.jsonl, where finished rows are saved as they finish

resume: run the same command again. Rows already in OUTPUT (by custom_id, --id-column or row
  number) are skipped, so an interrupted run continues and no row is done twice.
model: the THAI_* environment variables of the server (THAI_BASE_MODEL, THAI_LORA_PATH,
  THAI_ENGINE, THAI_MAX_BATCH_SIZE, THAI_MAX_NEW_TOKENS, ...; see docs/configuration.md).
exit status: 0 every row succeeded; 1 some rows failed (or the model did not load);
  2 usage error; 130 Ctrl-C (SIGINT); 143 SIGTERM.
"""


def build_parser() -> argparse.ArgumentParser:
    summarize = SummarizeRequest.model_fields
    parser = argparse.ArgumentParser(
        prog="python -m api.batch", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run many chat or summarize requests through the model in this process, "
        "keeping the engine's batch full, and write each result as it finishes.",
        epilog=EPILOG)
    parser.add_argument("input", metavar="INPUT", type=Path, help=".jsonl, .csv or .xlsx")
    parser.add_argument("output", metavar="OUTPUT", type=Path,
                        help=".jsonl, .csv or .xlsx (a .jsonl INPUT needs a .jsonl OUTPUT)")
    table = parser.add_argument_group("CSV and XLSX input")
    table.add_argument("--text-column", metavar="NAME",
                       help="the column to summarize [default: the column named 'text', else "
                       "the only column]")
    table.add_argument("--id-column", metavar="NAME",
                       help="a column of unique ids that names each row (custom_id in a .jsonl "
                       "OUTPUT) [default: the row number, the header being row 1]")
    table.add_argument("--max-tokens", type=int, metavar="N",
                       help=f"{summarize['max_tokens'].description} [default: THAI_MAX_NEW_TOKENS]")
    table.add_argument("--temperature", type=float, metavar="T",
                       help="Sampling temperature, 0 to 2 [default: THAI_TEMPERATURE]")
    parser.add_argument("--concurrency", type=int, metavar="N",
                        help="requests in flight [default: twice THAI_MAX_BATCH_SIZE, within "
                        "THAI_MAX_BATCH_SIZE + THAI_MAX_WAITING, so the batch never waits]")
    return parser


@dataclass
class Plan:
    """What to run, decided from the files alone (no engine yet)."""

    source: JsonlInput | TableInput
    sink: JsonlSink | CsvSink | XlsxSink
    total: int
    skipped: int
    resume: Resume

    @property
    def todo(self) -> int:
        return self.total - self.skipped

    def rows(self):
        return (row for row in self.source.rows() if row.key not in self.resume.keys)


def make_plan(args: argparse.Namespace, settings: ModelSettings) -> Plan:
    if not args.input.is_file():
        raise BatchUsageError(f"INPUT {args.input} does not exist or is not a file")
    in_fmt, out_fmt = file_format(args.input, "INPUT"), file_format(args.output, "OUTPUT")
    if args.output.exists() and args.output.resolve() == args.input.resolve():
        raise BatchUsageError("OUTPUT is the INPUT file; give another name")
    if not args.output.resolve().parent.is_dir():
        raise BatchUsageError(f"the folder of OUTPUT {args.output} does not exist")
    if args.concurrency is not None and args.concurrency < 1:
        raise BatchUsageError("--concurrency must be at least 1")

    if in_fmt == "jsonl":
        used = [f"--{name.replace('_', '-')}" for name in
                ("text_column", "id_column", "max_tokens", "temperature") if getattr(args, name) is not None]
        if used:
            raise BatchUsageError(f"{', '.join(used)} apply to CSV and XLSX input; in a .jsonl "
                                  "INPUT give max_tokens and temperature in each body")
        if out_fmt != "jsonl":
            raise BatchUsageError("a .jsonl INPUT (chat and summarize requests) needs a .jsonl OUTPUT")
        source: JsonlInput | TableInput = JsonlInput(args.input)
        sink: JsonlSink | CsvSink | XlsxSink = JsonlSink(args.output)
        what = "custom_id"
    else:
        check_generation_options(args, settings)
        source = TableInput(args.input, args.text_column, args.id_column, args.max_tokens,
                            args.temperature)
        sink = {"jsonl": JsonlSink, "csv": CsvSink, "xlsx": XlsxSink}[out_fmt](
            *((args.output,) if out_fmt == "jsonl" else (args.output, source)))
        what = f"values in the id column {source.id_column!r}" if source.id_column else "rows"

    keys = unique_keys(source.keys(), what)
    if not keys:
        raise BatchUsageError(f"INPUT {args.input} has no rows to run")
    resume = sink.resume()
    return Plan(source, sink, len(keys), len(keys & resume.keys), resume)


def check_generation_options(args: argparse.Namespace, settings: ModelSettings) -> None:
    """--max-tokens and --temperature are checked once here, not refused on every row."""
    try:
        SummarizeRequest.model_validate({"text": "x", "max_tokens": args.max_tokens,
                                         "temperature": args.temperature})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise BatchUsageError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from None
    if args.max_tokens is not None and args.max_tokens > settings.max_tokens_limit:
        raise BatchUsageError(f"--max-tokens {args.max_tokens} is above THAI_MAX_TOKENS_LIMIT "
                              f"({settings.max_tokens_limit})")


class Progress:
    """``done/total, errors, rows/s`` on stderr: redrawn in place on a terminal, a line every
    few seconds in a log file. Also the callback shape the UI will use: (done, total, errors)."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self.interval = 0.5 if self.tty else 10.0
        self.started = time.monotonic()
        self.last = 0.0
        self.done = self.errors = 0

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def __call__(self, done: int, total: int | None, errors: int) -> None:
        self.done, self.errors = done, errors
        now = time.monotonic()
        if now - self.last < self.interval and done != total:
            return
        self.last = now
        line = f"batch: {done}/{total} rows, {errors} failed, {self.rate():.1f} rows/s"
        self.stream.write(f"\r{line}\033[K" if self.tty else line + "\n")
        self.stream.flush()

    def end_line(self) -> None:
        if self.tty and self.last:
            self.stream.write("\n")


def say(message: str) -> None:
    print(f"batch: {message}", file=sys.stderr, flush=True)


async def execute(plan: Plan, settings: ModelSettings, concurrency: int, output: Path) -> int:
    """Load the model, run, and stop cleanly on SIGINT/SIGTERM (finished rows kept)."""
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    caught: list[int] = []

    def on_signal(signum: int) -> None:
        if caught:  # a second Ctrl-C: leave now; OUTPUT (or the xlsx sidecar) has every finished row
            os._exit(EXIT_SIGNAL[signum])
        caught.append(signum)
        print(file=sys.stderr)
        say(f"{signal.Signals(signum).name}: cancelling the rows in flight; finished rows are kept")
        main_task.cancel()

    for signum in EXIT_SIGNAL:
        loop.add_signal_handler(signum, on_signal, signum)

    from api.engine import build_engine
    from api.serving import Serving

    engine = build_engine(settings)
    progress = Progress()
    stats = None
    try:
        say("loading the model...")
        await engine.start()
        await engine.wait_ready()
        if not engine.ready:
            say(f"error: the model could not be loaded: {engine.error}")
            return EXIT_ROWS_FAILED
        info = engine.info
        where = ", ".join(filter(None, (info.device, info.dtype)))
        say(f"model {info.model_name} ready{f' ({where})' if where else ''}; "
            f"{plan.todo} rows to run, up to {concurrency} in flight")
        if info.demo:
            say("WARNING: this is the DEMO checkpoint (random weights): its output means nothing. "
                "Set THAI_BASE_MODEL and THAI_LORA_PATH (and THAI_REQUIRE_MODEL=true)")
        plan.sink.open()
        progress.started = time.monotonic()
        stats = await run_batch(Serving(engine, settings), plan.rows(), plan.sink, concurrency,
                                progress, total=plan.todo)
    except asyncio.CancelledError:
        if not caught:
            raise
        main_task.uncancel()
    except BatchAborted as exc:
        progress.end_line()
        say(f"error: the engine stopped working ({exc}); {progress.done} finished rows are in "
            f"{output}. Run the same command again to do the rest")
        return EXIT_ROWS_FAILED
    finally:
        plan.sink.close(complete=stats is not None)
        await engine.stop()
    progress.end_line()
    if caught:
        say(f"interrupted: {progress.done} rows finished this run and are in {output} "
            f"({plan.skipped + progress.done} of {plan.total} in all); the rows in flight were "
            "cancelled. Run the same command again to resume: rows in OUTPUT are skipped")
        return EXIT_SIGNAL[caught[0]]
    failed = stats.failed + plan.resume.failed
    say(f"{stats.done} rows done in {stats.elapsed:.1f} s ({stats.rate:.2f} rows/s), "
        f"{stats.failed} failed; skipped {plan.skipped} already in OUTPUT; results in {output}")
    if failed:
        say(f"{failed} of {plan.total} rows failed (their error is in {output})")
    return EXIT_ROWS_FAILED if failed else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = ModelSettings()
    except ValidationError as exc:
        print(f"error: {describe_validation_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        plan = make_plan(args, settings)
    except BatchUsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_SIGNAL[signal.SIGINT]
    resumed = f"; {plan.skipped} already in {args.output} are skipped" if plan.skipped else ""
    dropped = " (an incomplete last line, cut by a kill, was dropped and its row is redone)" \
        if plan.resume.dropped_partial else ""
    say(f"{plan.total} rows in {args.input}{resumed}{dropped}")
    if plan.todo == 0:
        plan.sink.close(complete=True)
        failed = plan.resume.failed
        say(f"nothing to do: every row is in {args.output}"
            + (f"; {failed} of them failed" if failed else ""))
        return EXIT_ROWS_FAILED if failed else EXIT_OK
    concurrency = args.concurrency or settings.max_batch_size + min(settings.max_batch_size,
                                                                    settings.max_waiting)
    return asyncio.run(execute(plan, settings, concurrency, args.output))


if __name__ == "__main__":
    sys.exit(main())
