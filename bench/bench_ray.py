"""Benchmark the Ray engine against the local engine: the same batch job, side by side, in one run.

    python -m bench.bench_ray --texts 2000 --images 200 --out bench/results/ray.json
GPU cluster (one actor per GPU, EasyOCR on the GPUs):
    RAY_ADDRESS=auto python -m bench.bench_ray --address auto --actors 1,2,4 --gpus-per-actor 1 --ocr-engine easyocr

Rows, per workload (spaCy NER over --texts texts; OCR over --images rendered pages), each the wall time
of `python -m serving predict` run in this process on the same input, one after another:
- local: the local engine (one runtime in this process).
- ray_N: --engine ray with N actors (each builds the runtime and loads the model itself).
Both include loading the model, so the ratio is what a user waits. Every row's import file must equal
the local one (region ids aside), or the run fails.

Ray's fixed cost is reported separately: starting a local cluster (ray.init), and a 1-task job on Ray
minus the same 1-task job on the local engine (staging, actor start, runtime build, model load on the
actor, result streaming). Without --address the script starts its own local cluster with
2 logical CPUs per core, so two 1-CPU actors fit beside Ray Data's read tasks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import model
from bench._common import write_report
from serving.cli.predict import remove_state, write_output
from serving.inference.build import build_runtime
from serving.jobs.engines.ray import RayJobRunner, RayOptions
from serving.jobs.runner import JobRunner
from serving.jobs.store import JobStore, create_store
from serving.settings import Settings

log = logging.getLogger("bench_ray")

NER_CONFIG = (
    '<View><Labels name="label" toName="text"><Label value="Person"/><Label value="Organization"/>'
    '<Label value="Location"/></Labels><Text name="text" value="$text"/></View>'
)
OCR_CONFIG = (
    '<View><Image name="image" value="$image"/><Labels name="label" toName="image"><Label value="Text"/>'
    '</Labels><Rectangle name="bbox" toName="image" model_name="{engine}"/>'
    '<TextArea name="transcription" toName="image" perRegion="true"/></View>'
)
PEOPLE = [
    "Barack Obama",
    "Angela Merkel",
    "Emmanuel Macron",
    "Jacinda Ardern",
    "Justin Trudeau",
    "Ada Lovelace",
]
PLACES = ["Seattle", "Paris", "Berlin", "Tokyo", "Toronto", "London", "Nairobi"]
ORGS = ["Microsoft", "the United Nations", "Siemens", "Toyota", "the Red Cross"]
WORDS = ["invoice", "total", "amount", "paid", "order", "number", "customer", "address", "ship", "date"]


def write_texts(path: Path, n: int) -> None:
    """Write n news-like sentences as JSONL tasks."""
    with open(path, "w") as fh:
        for i in range(n):
            text = (
                f"{PEOPLE[i % 6]} met leaders of {ORGS[i % 5]} in {PLACES[i % 7]} on Monday, "
                f"and {PEOPLE[(i + 2) % 6]} flew back to {PLACES[(i + 3) % 7]} with report {i}."
            )
            fh.write(json.dumps({"id": i, "data": {"text": text}}) + "\n")


def write_pages(folder: Path, n: int) -> None:
    """Render n small pages of three lines of words."""
    from PIL import Image, ImageDraw, ImageFont

    folder.mkdir(parents=True, exist_ok=True)
    font = ImageFont.load_default(size=28)
    for i in range(n):
        page = Image.new("RGB", (640, 200), "white")
        draw = ImageDraw.Draw(page)
        for line in range(3):
            words = " ".join(WORDS[(i + line + k) % len(WORDS)] for k in range(3)) + f" {i}"
            draw.text((24, 20 + 58 * line), words, fill="black", font=font)
        page.save(folder / f"page_{i:04d}.png")


def normalize(tasks: Any) -> Any:
    """Return the tasks with region ids renamed in order of appearance (fresh per run)."""
    names: dict[str, str] = {}

    def walk(obj: Any) -> Any:
        if isinstance(obj, list):
            return [walk(x) for x in obj]
        if isinstance(obj, dict):
            return {
                k: names.setdefault(v, f"r{len(names)}")
                if k in ("id", "parentID") and isinstance(v, str)
                else walk(v)
                for k, v in obj.items()
            }
        return obj

    return walk(tasks)


def run(
    config: Path, source: Path, out: Path, batch: int, actors: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Run one batch job as `python -m serving predict` does (store, runner, import file); return timings.

    actors=0 is the local engine. first_result_s is the wait for the first committed batch (start-up:
    staging, actors, runtime, model load); steady_tasks_per_s the rate from that batch to the last.
    """
    settings = Settings.from_env()
    folder = source if source.is_dir() else source.parent
    settings = settings.with_(batch_input_root=str(folder), predict_timeout_s=3600.0)
    state = out.with_name(out.name + ".state")
    remove_state(state)
    create_store(state, config.read_text(), input_path=source, job_id="bench").close()
    marks: list[tuple[float, int]] = []

    def progress(done: int, total: int | None) -> None:
        marks.append((time.perf_counter(), done))

    started = time.perf_counter()
    runtime = None
    if actors == 0:
        runtime = build_runtime(settings, model.families, roots=[folder])
        runner: JobRunner = JobRunner(settings, runtime, chunk_size=batch)
    else:
        options = RayOptions(
            address=args.address or None,
            actors=actors,
            cpus_per_actor=args.cpus_per_actor,
            gpus_per_actor=args.gpus_per_actor,
            quiet=True,
        )
        runner = RayJobRunner(settings, model.families, [folder], options=options, chunk_size=batch)
    try:
        meta = runner.run(state, progress=progress)
    finally:
        if runtime is not None:
            runtime.close()
    seconds = time.perf_counter() - started
    if not meta or meta.get("state") != "done" or meta.get("failed"):
        raise SystemExit(
            f"{f'ray x{actors}' if actors else 'local'}: job ended {meta and meta.get('state')}: {meta}"
        )
    store = JobStore(state)
    try:
        write_output(store, out)
    finally:
        store.close()
    remove_state(state)
    done = [(t, d) for t, d in marks if d > 0]
    (t0, d0), (t1, d1) = done[0], done[-1]
    n = d1
    return {
        "seconds": round(seconds, 2),
        "tasks_per_s": round(n / seconds, 2),
        "first_result_s": round(t0 - started, 2),
        # a rate over fewer than 4 later blocks says more about block sizes than about speed
        "steady_tasks_per_s": round((d1 - d0) / (t1 - t0), 2) if len(done) >= 5 and t1 > t0 else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--ocr-engine", default="tesseract", choices=("tesseract", "easyocr"))
    parser.add_argument("--actors", default="1,2", help="actor counts to run, comma separated")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--address", default="", help="an existing cluster (default: start a local one)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("NER_ENGINE", "spacy")
    actor_counts = [int(a) for a in args.actors.split(",") if a.strip()]

    import ray

    started = time.perf_counter()
    if args.address:
        ray.init(address=args.address, logging_level="WARNING")
    else:
        # a throwaway cluster on this machine (token auth on, as Ray 2.60 sets it for ray.init clusters)
        ray.init(
            num_cpus=2 * (os.cpu_count() or 1),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            logging_level="WARNING",
        )
    ray_init_s = time.perf_counter() - started
    report: dict[str, Any] = {
        "machine": f"{platform.node()} {os.cpu_count()} CPUs",
        "ray_init_s": round(ray_init_s, 2),
        "cluster": ray.cluster_resources(),
        "workloads": {},
    }
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
            root = Path(tmp)
            (root / "ner.xml").write_text(NER_CONFIG)
            (root / "ocr.xml").write_text(OCR_CONFIG.format(engine=args.ocr_engine))
            write_texts(root / "texts.jsonl", args.texts)
            write_pages(root / "pages", args.images)
            (root / "one").mkdir()
            write_texts(root / "one" / "one.jsonl", 1)
            # fixed cost: one task through each engine (everything but the per-task work)
            one = root / "one" / "one.jsonl"
            local_one = run(root / "ner.xml", one, root / "one_local.json", args.batch_size, 0, args)
            ray_one = run(root / "ner.xml", one, root / "one_ray.json", args.batch_size, 1, args)
            report["one_task_job_s"] = {"local": local_one["seconds"], "ray_1": ray_one["seconds"]}
            report["ray_fixed_cost_s"] = round(ray_one["seconds"] - local_one["seconds"], 2)
            workloads = [
                ("ner_spacy", root / "ner.xml", root / "texts.jsonl", args.texts),
                (f"ocr_{args.ocr_engine}", root / "ocr.xml", root / "pages", args.images),
            ]
            for name, config, source, n in workloads:
                rows: dict[str, Any] = {}
                local_out = root / f"{name}_local.json"
                rows["local"] = run(config, source, local_out, args.batch_size, 0, args)
                expected = normalize(json.loads(local_out.read_text()))
                for actors in actor_counts:
                    out = root / f"{name}_ray{actors}.json"
                    row = run(config, source, out, args.batch_size, actors, args)
                    if normalize(json.loads(out.read_text())) != expected:
                        raise SystemExit(
                            f"{name}: Ray with {actors} actors gave other predictions than local"
                        )
                    row["vs_local"] = round(rows["local"]["seconds"] / row["seconds"], 2)
                    steady = rows["local"]["steady_tasks_per_s"]
                    if steady and row["steady_tasks_per_s"]:
                        row["steady_vs_local"] = round(row["steady_tasks_per_s"] / steady, 2)
                    rows[f"ray_{actors}"] = row
                report["workloads"][name] = {"tasks": n, "rows": rows, "same_output": True}
    finally:
        ray.shutdown()

    log.info(
        "ray.init %.1f s; a 1-task job: local %.1f s, ray %.1f s (Ray's fixed cost per job %.1f s)",
        ray_init_s, report["one_task_job_s"]["local"], report["one_task_job_s"]["ray_1"], report["ray_fixed_cost_s"],
    )  # fmt: skip
    for name, workload in report["workloads"].items():
        for row, v in workload["rows"].items():
            steady = f", steady {v['steady_vs_local']:.2f}x" if "steady_vs_local" in v else ""
            ratio = f"; {v['vs_local']:.2f}x local{steady}" if "vs_local" in v else ""
            log.info(
                "%s %d tasks, %s: %.1f s (%.1f/s), first result after %.1f s, steady %s/s%s",
                name, workload["tasks"], row, v["seconds"], v["tasks_per_s"], v["first_result_s"],
                v["steady_tasks_per_s"], ratio,
            )  # fmt: skip
    write_report(args.out, report)


if __name__ == "__main__":
    main()
