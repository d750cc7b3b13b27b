"""Benchmark HyperText NER: /predict on HTML pages vs the engine on the pages' extracted texts, in one run.

    python -m bench.bench_hypertext --n 1000 --out bench/results/hypertext.json

The pages are generated (seeded): ~5 kB of HTML each, with a head, styles, scripts, comments, nested
blocks, inline tags across names, lists and a table. Rows (pages/s, same pages, measured one after
another in this process, spaCy's offline en_core_web_sm on the CPU):
- engine_on_texts: NerBackend's engine alone on the visible texts extracted beforehand (batches of
  --batch-size), i.e. what NER on plain text would cost.
- html_model: serving.results.hypertext alone: parse each page (cache cleared) and map every entity found by
  the engine row to its XPath range; the cost the HTML adds, without the model.
- predict_app: POST /predict with every page in one request through create_app's test client (parse,
  batcher, engine, XPath mapping, validation of every region against the page, JSON).
The ratio predict_app / engine_on_texts says what the HTML handling costs next to the model.
"""

from __future__ import annotations

import argparse
import logging
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.ner import SPACY_DEFAULT, NerBackend
from bench._common import write_report
from serving.contract import ModelSpec
from serving.results.hypertext import parse_html
from serving.settings import Settings

log = logging.getLogger("bench_hypertext")

CONFIG = """<View>
  <HyperText name="html" value="$html"/>
  <HyperTextLabels name="ner" toName="html">
    <Label value="Person"/><Label value="Organization"/><Label value="Location"/>
  </HyperTextLabels>
</View>"""
PEOPLE = [
    "Barack Obama",
    "Angela Merkel",
    "Tim Cook",
    "Marie Curie",
    "Satya Nadella",
    "José García",
    "Li Wei",
]
ORGS = ["Apple", "Microsoft", "the United Nations", "Google", "Acme Corp", "the European Union"]
PLACES = ["Paris", "Berlin", "Tokyo", "New York", "São Paulo", "London", "Nairobi", "Geneva"]
FILLER = (
    "the committee discussed the budget for next year and agreed to publish a report before the summer",
    "several participants asked for more time to review the proposal in detail",
    "the meeting ended late in the evening after a long debate about priorities",
    "a short statement was released to the press with the main conclusions",
)


def _sentence(rng: random.Random) -> str:
    who, org, where = rng.choice(PEOPLE), rng.choice(ORGS), rng.choice(PLACES)
    first, last = who.split(" ", 1)
    forms = [
        f"<b>{who}</b> met representatives of {org} in {where}; {rng.choice(FILLER)}.",
        f"In {where}, {first} <a href='/people/{rng.randint(1, 999)}'>{last}</a> spoke for {org}. {rng.choice(FILLER).capitalize()}.",
        f"{rng.choice(FILLER).capitalize()}<!-- note {rng.randint(1, 99)} -->, said {who} of <i>{org}</i>.",
        f"Later,\n      {who} travelled from {where} to {rng.choice(PLACES)} &amp; back 😀.",
    ]
    return rng.choice(forms)


def make_page(rng: random.Random, target_bytes: int = 5000) -> str:
    """Return one generated HTML page of about target_bytes (UTF-8)."""
    head = (
        "<!DOCTYPE html>\n<html>\n  <head>\n    <meta charset='utf-8'>\n    <title>Report</title>\n"
        "    <style>body { font: 14px sans-serif } .x { color: #333 }</style>\n"
        "    <script>window.dataLayer = [];</script>\n  </head>\n  <body>\n"
    )
    parts = [head, f"    <h1>News from {rng.choice(PLACES)}</h1>\n"]
    size = len(head.encode())
    while size < target_bytes - 200:
        kind = rng.random()
        if kind < 0.6:
            block = (
                "    <div class='section'>\n      <p>"
                + " ".join(_sentence(rng) for _ in range(3))
                + "</p>\n    </div>\n"
            )
        elif kind < 0.8:
            items = "".join(f"\n        <li>{_sentence(rng)}</li>" for _ in range(3))
            block = f"    <ul>{items}\n    </ul>\n"
        elif kind < 0.9:
            block = (
                "    <table><tr><td>"
                + rng.choice(PEOPLE)
                + "</td><td>"
                + rng.choice(ORGS)
                + "</td></tr></table>\n"
                "    <script>track('view');</script>\n"
            )
        else:
            block = f"    <h2>{rng.choice(PEOPLE)} in {rng.choice(PLACES)}</h2>\n"
        parts.append(block)
        size += len(block.encode())
    parts.append("  </body>\n</html>\n")
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table; write JSON with --out."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1000, help="HTML pages")
    parser.add_argument("--page-bytes", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=NerBackend.max_batch_size)
    parser.add_argument("--model", default=SPACY_DEFAULT, help="spaCy package (or a transformers id/folder)")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    rng = random.Random(0)
    pages = [make_page(rng, args.page_bytes) for _ in range(args.n)]
    mean_bytes = sum(len(p.encode()) for p in pages) / len(pages)
    texts = [parse_html(p).text for p in pages]
    parse_html.cache_clear()
    backend = NerBackend(ModelSpec("ner", args.model), Settings(ner_engine="spacy"))
    backend.load("cpu")
    engine = backend._forward_spacy if backend.engine == "spacy" else backend._forward_transformers
    engine(texts[: min(8, len(texts))])  # warm-up
    rows: dict[str, float] = {}

    started = time.perf_counter()
    spans = []
    for i in range(0, len(texts), args.batch_size):
        spans.extend(engine(texts[i : i + args.batch_size]))
    rows["engine_on_texts"] = len(texts) / (time.perf_counter() - started)
    entities = sum(len(s) for s in spans)

    parse_html.cache_clear()
    started = time.perf_counter()
    mapped = 0
    for page, found in zip(pages, spans, strict=True):
        doc = parse_html(page)
        mapped += sum(doc.span(s.start, s.end) is not None for s in found)
    rows["html_model"] = len(pages) / (time.perf_counter() - started)

    from serving.http.app import create_app
    from serving.inference.runtime import Runtime

    parse_html.cache_clear()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(model_dir=tmp, ner_engine="spacy", warmup=(), max_batch_size=args.batch_size)
        runtime = Runtime(settings, families={"ner": NerBackend})
        client = create_app(settings, runtime=runtime).test_client()
        body = {"tasks": [{"id": 1, "data": {"html": pages[0]}}], "label_config": CONFIG}
        assert client.post("/predict", json=body).status_code == 200  # loads the model
        parse_html.cache_clear()
        body = {
            "tasks": [{"id": i + 1, "data": {"html": p}} for i, p in enumerate(pages)],
            "label_config": CONFIG,
        }
        started = time.perf_counter()
        response = client.post("/predict", json=body)
        rows["predict_app"] = len(pages) / (time.perf_counter() - started)
        assert response.status_code == 200, response.get_data(as_text=True)[:300]
        results: list[dict[str, Any]] = response.json["results"]
        regions = sum(len(r.get("result", [])) for r in results)
        failed = sum("result" not in r for r in results)
        runtime.close()

    report = {
        "bench": "hypertext",
        "machine": platform.platform(),
        "model": backend.version(),
        "pages": len(pages),
        "mean_page_bytes": round(mean_bytes),
        "mean_visible_chars": round(sum(len(t) for t in texts) / len(texts)),
        "entities_found": entities,
        "entities_mapped": mapped,
        "regions_in_predictions": regions,
        "failed_tasks": failed,
        "pages_per_s": {k: round(v, 1) for k, v in rows.items()},
        "predict_over_engine": round(rows["predict_app"] / rows["engine_on_texts"], 3),
        "html_model_ms_per_page": round(1000.0 / rows["html_model"], 3),
    }
    log.info(
        "%d pages of %.0f bytes (%d visible chars), %d entities (%d mapped), %d regions answered",
        len(pages),
        mean_bytes,
        report["mean_visible_chars"],
        entities,
        mapped,
        regions,
    )
    for name, value in rows.items():
        log.info("%-16s %8.1f pages/s", name, value)
    log.info(
        "predict_app / engine_on_texts = %.3f; the HTML model costs %.3f ms a page",
        report["predict_over_engine"],
        report["html_model_ms_per_page"],
    )
    write_report(args.out, report)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
