"""Long-text and document numbers through a real server: long texts and each file type.

    python -m bench.documents_report                  # demo checkpoint, default settings
    python -m bench.documents_report --json out.json

1. A 100,000-character Thai text (assets/thai_corpus.txt repeated) through
   ``/v1/summarize``: chunks, rounds, seconds, usage.
2. The same source text (the first ``--paragraphs`` paragraphs of the corpus) as .txt,
   .md, .html, .docx and .pdf (headless Chromium, Sarabun) through
   ``/v1/summarize/document``: the characters the server extracted against the source's
   (whitespace removed), and for the PDF the share of the source's Thai characters that
   raw pypdf and the server's cleaned extraction recover.

Prints a table and JSON. Not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.pdf_recovery import corpus_paragraphs, measure, pypdf_pages  # noqa: E402
from bench.servers import ServerPool  # noqa: E402


def long_text(characters: int) -> str:
    corpus = (REPO / "assets" / "thai_corpus.txt").read_text(encoding="utf-8")
    return (corpus * (characters // len(corpus) + 1))[:characters]


def files_for(source: str) -> dict[str, bytes]:
    from tests.documents_support import docx_bytes, html_bytes, markdown_bytes, pdf_bytes

    return {"source.txt": source.encode("utf-8"), "source.md": markdown_bytes(source),
            "source.html": html_bytes(source), "source.docx": docx_bytes(source),
            "source.pdf": pdf_bytes(source)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="base model folder (default: the generated demo checkpoint)")
    p.add_argument("--lora", default="", help="adapter folder")
    p.add_argument("--characters", type=int, default=100_000, help="length of the long text")
    p.add_argument("--paragraphs", type=int, default=30, help="corpus paragraphs in each file")
    p.add_argument("--max-tokens", type=int, default=150, help="summary length")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="documents-report-"))
    model, lora = args.model, args.lora
    if model is None:
        from api.engine.demo_checkpoint import build_demo_checkpoint

        base, adapter = build_demo_checkpoint(work / "demo")
        model, lora = str(base), str(adapter)
    source = "\n\n".join(corpus_paragraphs(args.paragraphs))
    files = files_for(source)
    result: dict = {"settings": {"max_tokens": args.max_tokens, "temperature": 0}}
    with ServerPool(work / "logs", env={"THAI_DTYPE": "float32"}) as pool:
        server = pool.start_ours(model, lora_dir=lora, max_batch_size=16)
        server_name = "bench"
        with httpx.Client(timeout=600) as client:
            text = long_text(args.characters)
            started = time.perf_counter()
            response = client.post(server.url + "/v1/summarize", json={
                "model": server_name, "text": text, "max_tokens": args.max_tokens, "temperature": 0})
            seconds = time.perf_counter() - started
            response.raise_for_status()
            body = response.json()
            result["long_text"] = {"characters": len(text), "seconds": round(seconds, 2),
                                   "chunks": body["chunks"], "rounds": body["rounds"],
                                   "usage": body["usage"], "summary_characters": len(body["summary"])}
            rows = []
            for name, data in files.items():
                started = time.perf_counter()
                response = client.post(server.url + "/v1/summarize/document",
                                       files={"file": (name, data)},
                                       data={"max_tokens": str(args.max_tokens), "temperature": "0"})
                seconds = time.perf_counter() - started
                response.raise_for_status()
                body = response.json()
                document = body["document"]
                rows.append({"file": name, "bytes": len(data), "kind": document["kind"],
                             "pages": document["pages"], "characters": document["characters"],
                             "source_characters": len(source), "chunks": body["chunks"],
                             "seconds": round(seconds, 2)})
            result["documents"] = rows
    pdf = work / "source.pdf"
    pdf.write_bytes(files["source.pdf"])
    from api.documents.extract import extract_document

    data = files["source.pdf"]
    result["pdf_thai"] = {
        "raw_pypdf": measure(source, "\n".join(pypdf_pages(pdf))),
        "cleaned": measure(source, extract_document(data, "source.pdf", max_bytes=len(data) + 1,
                                                    max_pages=1000).text)}
    lt = result["long_text"]
    print(f"long text: {lt['characters']} characters -> {lt['chunks']} calls in {lt['rounds']} "
          f"rounds, {lt['seconds']} s, usage {lt['usage']}")
    print("| file | bytes | kind | pages | characters extracted / source | calls | seconds |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in result["documents"]:
        print(f"| {r['file']} | {r['bytes']} | {r['kind']} | {r['pages']} | {r['characters']} / "
              f"{r['source_characters']} | {r['chunks']} | {r['seconds']} |")
    for name, m in result["pdf_thai"].items():
        print(f"PDF {name}: similarity {m['similarity']}, Thai characters recovered {m['thai_recovered']}")
    if args.json:
        args.json.write_text(json.dumps(result, ensure_ascii=False, indent=1))
    print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
