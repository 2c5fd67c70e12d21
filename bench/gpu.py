"""The GPU benchmark: training, loading, labelling and extraction speed on one device, in one run of at most 8 minutes.

    bash bench/gpu.sh [--out bench_out/gpu]       # on a GPU machine (see bench/gpu.sh for the wheel install line)
    python bench/gpu.py --smoke [--out DIR]       # the same code paths on CPU at tiny sizes, in about a minute

Sections, in order (each catches its own failure, records the error and lets the next one run; each has a time
budget, enforced with SIGALRM, that keeps the whole run under 8 minutes on a GPU):
  train    training steps on in-memory batches (random audio and labels, bench/train.py's helpers) of mert_95m, the
           same over the log-mel front end (mert_logmel_95m) and mert_330m at the presets' per-GPU batch, bf16
           and fp16, eager and train.compile: audio-seconds per second, MFU of pretrain.model.training_flops against
           the bf16 matmul peak measured here and against the datasheet (pretrain.train.PEAK_TFLOPS), peak memory,
           and Dynamo's graph breaks for compiled rows
  loader   mert_95m (bf16, k-means labels) trained by pretrain.train.Trainer over shards of the demo corpus on
           local disk through data.stream.AudioLoader at the preset's num_workers: data-wait fraction of step time
  encodec  the EnCodec teacher (random init: the same network and cost) on the device: real-time factor of the dump
           path today (decode + encode per segment, bench/labels.py) and of batched encodes at a few batch sizes
  kmeans   the log-mel+chroma k-means teacher (features + nearest centroid) on the device: real-time factor of the
           dump path and of encoding device-resident audio
  extract  pretrain.downstream.extract over the demo corpus with a random-init encoder: clips per second, patchout 1, 2 and 4
The corpus, shards and teacher (bench/learning.py's prepare_training) are cached in OUT/data, so a rerun skips them.
Everything goes to OUT/gpu.json (rewritten after every section); one table is printed at the end.
"""
from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import shutil
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from types import SimpleNamespace

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import soundfile as sf  # noqa: E402
import torch  # noqa: E402

import labels as label_bench  # noqa: E402  bench/labels.py
import learning  # noqa: E402  bench/learning.py
from train import batches, forward_inputs, timed, trainer_step  # noqa: E402  bench/train.py
from data.audio import SAMPLE_RATE  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.engine import device_for_rank, graph_breaks, init_distributed  # noqa: E402
from pretrain.model import Encoder, training_flops  # noqa: E402
from pretrain.objectives.mert import MertObjective  # noqa: E402
from pretrain.train import datasheet_flops  # noqa: E402

ENCODEC = {"encodec": [1024] * 8}  # the presets' teacher: 8 EnCodec codebooks x 1024
FULL = {
    # a preset, or PRESET:key=value,... (the same preset with overrides)
    "presets": ["configs/mert_95m.yaml", "configs/mert_logmel_95m.yaml", "configs/mert_330m.yaml"],
    "precisions": ["bf16", "fp16"],
    "compile_backend": "inductor", "train_overrides": [], "train_steps": 12, "warmup_steps": 3, "row_seconds": 45,
    "loader_preset": "configs/mert_95m.yaml", "loader_overrides": [], "loader_steps": 60, "minutes": 2.0,
    "encodec_batches": [1, 8, 32, 64], "encodec_seconds": 10.0, "dump_seconds": 120.0,
    "extract_preset": "configs/mert_95m.yaml",
    "extract_clips": 64, "matmul_size": 8192,
    "budget_s": {"train": 240, "loader": 120, "encodec": 30, "kmeans": 20, "extract": 30},  # 440 s + start-up
}
# CPU, tiny sizes: fp16 is GPU-only; Dynamo's "eager" backend traces (and counts graph breaks) like Inductor
# without Inductor's C++ code generation, which takes minutes on 2 cores (tests/test_compile.py runs Inductor).
SMOKE = {
    "presets": ["configs/tiny.yaml", "configs/tiny.yaml:model.frontend=logmel"], "precisions": ["fp32", "bf16"],
    "compile_backend": "eager", "train_overrides": ["data.batch_size=2", "data.crop_seconds=1.0"], "train_steps": 2,
    "warmup_steps": 1, "row_seconds": 20, "loader_preset": "configs/tiny.yaml",
    "loader_overrides": ["data.num_workers=1", "data.batch_size=4", "data.crop_seconds=1.0"], "loader_steps": 4,
    "minutes": 0.5, "encodec_batches": [1, 2], "encodec_seconds": 2.0, "dump_seconds": 4.0,
    "extract_preset": "configs/tiny.yaml",
    "extract_clips": 4, "matmul_size": 512,
    "budget_s": {"train": 240, "loader": 120, "encodec": 60, "kmeans": 60, "extract": 60},
}


class OutOfTime(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    """Raises OutOfTime in the main thread after `seconds` (the section's budget)."""
    def expire(signum, frame):
        raise OutOfTime(f"over its budget of {seconds:.0f} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_section(name: str, fn, ctx: dict, results: dict) -> None:
    """fn(ctx, record) fills `record`; a failure (or the budget running out) keeps what it recorded so far
    and adds "error"."""
    record = results["sections"][name] = {}
    started = time.perf_counter()
    print(f"-- {name} (budget {ctx['plan']['budget_s'][name]} s)", flush=True)
    try:
        with time_limit(ctx["plan"]["budget_s"][name]):
            fn(ctx, record)
    except (Exception, SystemExit) as error:  # SystemExit: bench/learning.py's stages exit on failure
        record["error"] = f"{type(error).__name__}: {error}".strip()[:2000]
        record["traceback"] = traceback.format_exc()[-4000:]
        print(f"   {name} failed: {record['error'][:300]}", flush=True)
    finally:
        record["seconds"] = round(time.perf_counter() - started, 1)
        free_memory()
        write_json(ctx["out"], results)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_compiler() -> None:
    """Forgets compiled graphs and Dynamo's counters (graph breaks are counted per row)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_json(out: str, results: dict) -> None:
    path = os.path.join(out, "gpu.json")
    with open(path + ".tmp", "w") as file:
        json.dump(results, file, indent=1, default=str)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------- peaks


def matmul_peak(device: torch.device, size: int) -> float:
    """FLOP/s of the best of a few bf16 [size x size] @ [size x size] products on `device`."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(6):
        sync(device)
        started = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - started) / 4)
    return 2 * size ** 3 / best


# ---------------------------------------------------------------- a. training on in-memory batches


def train_rows(plan: dict) -> list[tuple[str, str, bool]]:
    """Every preset x precision, eager rows first: compiling takes longest, so it is what the budget may cut."""
    return [(preset, precision, compiled) for compiled in (False, True) for preset in plan["presets"]
            for precision in plan["precisions"]]


def train_row(preset: str, precision: str, compiled: bool, ctx: dict) -> dict:
    plan, device = ctx["plan"], ctx["device"]
    path, overrides = preset_spec(preset)
    cfg = load_config(path, ["data.shards=unused", "data.labels=[unused]", f"train.precision={precision}",
                             f"train.compile={str(compiled).lower()}", *plan["train_overrides"], *overrides])
    reset_compiler()
    torch.manual_seed(0)
    model = MertObjective(cfg.objective, Encoder(cfg.model), ENCODEC).to(device).train()
    step = trainer_step(model, cfg, device, plan["compile_backend"])
    accum = cfg.train.grad_accum  # the preset's: optimizer steps every `accum` micro-batches, as in its real run
    measured = -(-plan["train_steps"] // accum) * accum
    data = batches(cfg, min(4, measured), ENCODEC)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row = {"preset": preset_name(preset), "precision": precision, "compile": compiled, "batch": cfg.data.batch_size,
           "crop_seconds": cfg.data.crop_seconds, "grad_accum": accum,
           "first_step_s": timed(step, data[:1], device)}  # with compilation when compiled
    if compiled:
        row["graph_breaks"] = graph_breaks()
    timed(step, (data * plan["warmup_steps"])[:plan["warmup_steps"]], device)
    per_step = timed(step, (data * measured)[:measured], device)
    flops = training_flops(cfg.model, cfg.data.crop_samples) * cfg.data.batch_size / per_step
    row.update({"steps": measured, "step_s": per_step,
                "audio_seconds_per_second": cfg.data.batch_size * cfg.data.crop_seconds / per_step,
                "model_tflops": flops / 1e12, "mfu_measured_peak": flops / ctx["matmul_peak"],
                "mfu_datasheet": flops / ctx["datasheet_peak"] if ctx["datasheet_peak"] else None,
                "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None})
    if compiled:
        row["graph_breaks"]["where"] = break_locations(model, forward_inputs(data[0], device))
    return row


def preset_spec(preset: str) -> tuple[str, list[str]]:
    """"PATH" or "PATH:key=value,...": (the preset file, its overrides)."""
    path, _, overrides = preset.partition(":")
    return path, [item for item in overrides.split(",") if item]


def preset_name(preset: str) -> str:
    """mert_95m; mert_95m+frontend=logmel for a preset with overrides."""
    path, overrides = preset_spec(preset)
    return "+".join([os.path.basename(path).removesuffix(".yaml"), *(o.split(".")[-1] for o in overrides)])


def break_locations(model, batch: tuple) -> dict[str, int]:
    """Where Dynamo splits the objective's forward (torch._dynamo.explain): {"file:line: reason": count},
    at the innermost frame of this project's code."""
    try:
        explained = torch._dynamo.explain(model.forward)(*batch, torch.Generator().manual_seed(1))
    except Exception as error:  # the row's measured figures stay
        return {f"torch._dynamo.explain failed: {type(error).__name__}: {error}"[:300]: 0}
    where: dict[str, int] = {}
    for br in explained.break_reasons:
        ours = [f for f in br.user_stack if f.filename.startswith(ROOT) and "site-packages" not in f.filename]
        frame = ours[-1] if ours else (br.user_stack[-1] if br.user_stack else None)
        place = f"{os.path.relpath(frame.filename, ROOT)}:{frame.lineno} ({frame.line.strip()[:60]})" if frame else "?"
        key = f"{place}: {br.reason.splitlines()[0][:100]}"
        where[key] = where.get(key, 0) + 1
    return where


def section_train(ctx: dict, record: dict) -> None:
    record["rows"] = rows = []
    deadline = time.perf_counter() + ctx["plan"]["budget_s"]["train"]
    for preset, precision, compiled in train_rows(ctx["plan"]):
        what = f"{preset} {precision}{' compile' if compiled else ''}"
        if deadline - time.perf_counter() < ctx["plan"]["row_seconds"]:
            rows.append({"preset": preset_name(preset), "precision": precision, "compile": compiled,
                         "error": "skipped: the section's time budget is spent"})
            continue
        try:
            rows.append(train_row(preset, precision, compiled, ctx))
            print(f"   {what}: {rows[-1]['audio_seconds_per_second']:.1f} audio-s/s", flush=True)
        except OutOfTime:
            rows.append({"preset": preset_name(preset), "precision": precision, "compile": compiled,
                         "error": "stopped: over the section's time budget"})
            raise
        except Exception as error:  # one row's failure (an OOM, a compile error) is that row's
            rows.append({"preset": preset_name(preset), "precision": precision, "compile": compiled,
                         "error": f"{type(error).__name__}: {error}"[:2000], "traceback": traceback.format_exc()[-3000:]})
            print(f"   {what} failed: {rows[-1]['error'][:300]}", flush=True)
        finally:
            reset_compiler()
            free_memory()


# ---------------------------------------------------------------- shared preparation: corpus, shards, teacher


def prepared(ctx: dict) -> dict:
    """The demo corpus, its shards and the log-mel+chroma k-means teacher (fit + dump), made once in OUT/data."""
    if "data" not in ctx:
        work = os.path.join(ctx["out"], "data")
        labels = learning.prepare_training(SimpleNamespace(minutes=ctx["plan"]["minutes"], teacher="logmel_chroma",
                                                           timbres="fixed", config="configs/small.yaml", corpus=None),
                                           work)
        shards = os.path.join(work, "shards")
        ctx["data"] = {"work": work, "shards": shards, "labels": labels, "corpus": os.path.join(work, "corpus", "audio"),
                       "teacher": os.path.join(work, "teachers", "logmel_chroma"),
                       "flacs": first_seconds(label_bench.load_segments(shards), ctx["plan"]["dump_seconds"])}
    return ctx["data"]


def first_seconds(flacs: list[bytes], seconds: float) -> list[bytes]:
    """The first segments holding at least `seconds` of audio (all of them if they hold less)."""
    total, kept = 0.0, []
    for flac in flacs:
        if total >= seconds:
            break
        kept.append(flac)
        total += sf.info(io.BytesIO(flac)).duration
    return kept


# ---------------------------------------------------------------- b. the real loader


def section_loader(ctx: dict, record: dict) -> None:
    from pretrain.train import Trainer

    plan, data = ctx["plan"], prepared(ctx)
    run_dir = os.path.join(ctx["out"], "loader-run")
    shutil.rmtree(run_dir, ignore_errors=True)
    steps = plan["loader_steps"]
    cfg = load_config(plan["loader_preset"], [
        f"data.shards={data['shards']}", f"data.labels=[{data['labels']}]", f"train.run_dir={run_dir}",
        "train.precision=" + ("bf16" if ctx["device"].type == "cuda" else "fp32"), f"train.steps={steps}",
        f"train.log_every={max(1, steps // 3)}", f"train.save_every={10 * steps}", "train.eval_every=0",
        *plan["loader_overrides"]])
    trainer = Trainer(cfg, ctx["device"], 0, 1)
    trainer.fit()
    with open(os.path.join(run_dir, "metrics.jsonl")) as file:
        logged = [json.loads(line) for line in file if '"data_wait_fraction"' in line]
    last = logged[-1]  # the first interval holds the workers' start-up
    record.update({"preset": preset_name(plan["loader_preset"]),
                   "num_workers": cfg.data.num_workers, "batch": cfg.data.batch_size, "precision": cfg.train.precision,
                   "steps": steps, "data_wait_fraction": last["data_wait_fraction"],
                   "audio_seconds_per_second": last["audio_seconds_per_second"], "mfu": last.get("mfu"),
                   "intervals": [{k: row.get(k) for k in ("step", "data_wait_fraction", "audio_seconds_per_second")}
                                 for row in logged]})
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)


# ---------------------------------------------------------------- c. EnCodec labels


def batched_rate(encode, device: torch.device, batch: int, seconds: float, rounds: int = 3) -> float:
    """Audio-seconds per second of encode(audio [batch, 1, samples]) on `device`, best of `rounds`."""
    audio = 0.1 * torch.randn(batch, 1, int(seconds * SAMPLE_RATE), device=device)
    with torch.inference_mode():
        encode(audio)  # warm-up: kernels, allocator
        best = float("inf")
        for _ in range(rounds):
            sync(device)
            started = time.perf_counter()
            encode(audio)
            sync(device)
            best = min(best, time.perf_counter() - started)
    return batch * seconds / best


def section_encodec(ctx: dict, record: dict) -> None:
    from teachers.encodec import EncodecTeacher

    plan, device = ctx["plan"], ctx["device"]
    teacher = EncodecTeacher(random_init=True, device=str(device))
    flacs = prepared(ctx)["flacs"]  # the dump path: decode, encode one segment, codes back to the host
    record["real_time_factor_dump_path"] = label_bench.rate(lambda wave: teacher.encode(wave).cpu(), flacs)
    record["real_time_factor_by_batch"] = by_batch = {}
    for batch in plan["encodec_batches"]:
        try:
            by_batch[batch] = batched_rate(teacher.model.encode, device, batch, plan["encodec_seconds"])
        except torch.cuda.OutOfMemoryError:
            by_batch[batch] = None
            break
    best = max((b for b in by_batch if by_batch[b]), key=by_batch.get)
    record.update({"segment_seconds": plan["encodec_seconds"], "best_batch": best,
                   "real_time_factor": by_batch[best]})
    record["real_time_factor_dump_path_batched"] = batched_dump_rate(teacher, flacs, best)


def batched_dump_rate(teacher, encoded: list[bytes], batch: int) -> float:
    """Audio-seconds per second of the dump's path with `--batch`: decode `batch` segments, encode_batch, codes
    back to the host."""
    from teachers.dump import batches

    started, seconds = time.perf_counter(), 0.0
    for group in batches(encoded, batch):
        waves = [torch.from_numpy(sf.read(io.BytesIO(member), dtype="float32")[0]) for member in group]
        with torch.inference_mode():
            [codes.cpu() for codes in teacher.encode_batch(waves)]
        seconds += sum(len(wave) for wave in waves) / SAMPLE_RATE
    return seconds / (time.perf_counter() - started)


# ---------------------------------------------------------------- d. k-means labels


def section_kmeans(ctx: dict, record: dict) -> None:
    from teachers.kmeans import KMeansTeacher

    data, device = prepared(ctx), ctx["device"]
    teacher = KMeansTeacher(data["teacher"], str(device))
    record["real_time_factor_dump_path"] = label_bench.rate(lambda wave: teacher.encode(wave).cpu(), data["flacs"])
    waves = [torch.from_numpy(sf.read(io.BytesIO(flac), dtype="float32")[0]).to(device) for flac in data["flacs"]]
    with torch.inference_mode():
        teacher.encode(waves[0])
        sync(device)
        started = time.perf_counter()
        for wave in waves:
            teacher.encode(wave)
        sync(device)
    record["real_time_factor"] = sum(len(w) for w in waves) / SAMPLE_RATE / (time.perf_counter() - started)
    record["segments"] = len(waves)


# ---------------------------------------------------------------- e. extraction


def section_extract(ctx: dict, record: dict) -> None:
    from pretrain.downstream.extract import EncoderLayers, ExtractConfig, extract

    plan, data, device = ctx["plan"], prepared(ctx), ctx["device"]
    cfg = load_config(plan["extract_preset"], ["data.shards=unused", "data.labels=[unused]"])
    torch.manual_seed(0)
    encoder = Encoder(cfg.model)
    record.update({"preset": preset_name(plan["extract_preset"]),
                   "window_seconds": cfg.data.crop_seconds, "clips_per_second": {}})
    for every in (1, 2, 4):
        out = os.path.join(ctx["out"], f"extract-T{every}")
        shutil.rmtree(out, ignore_errors=True)  # extract skips clips already done
        layers_of = EncoderLayers(encoder, device, every)
        settings = ExtractConfig(cfg.data.crop_seconds, cfg.data.crop_seconds, patchout=every)
        extract(data["corpus"], out, layers_of, settings, {"random_init": plan["extract_preset"]}, limit=1)  # warm-up
        shutil.rmtree(out)
        report = extract(data["corpus"], out, layers_of, settings, {"random_init": plan["extract_preset"]},
                         limit=plan["extract_clips"])
        record["clips_per_second"][every] = report["clips"] / report["seconds"]
        record["clips"], record["audio_seconds"] = report["clips"], report["audio_seconds"]
        shutil.rmtree(out)


SECTIONS = {"train": section_train, "loader": section_loader, "encodec": section_encodec,
            "kmeans": section_kmeans, "extract": section_extract}


# ---------------------------------------------------------------- the table


def percent(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def table(results: dict) -> str:
    s = results["sections"]
    lines = [f"GPU benchmark on {results['device_name']} ({'smoke, CPU' if results['smoke'] else 'full'}); "
             f"bf16 matmul peak measured {results['matmul_peak_tflops']:.3g} TFLOP/s, datasheet "
             f"{results['datasheet_peak_tflops'] or '-'} TFLOP/s",
             f"{'section':<8} {'what':<30} {'figures'}"]

    def line(section: str, what: str, figures: str) -> None:
        lines.append(f"{section:<8} {what:<30} {figures}")

    for row in s.get("train", {}).get("rows", []):
        what = f"{row['preset']} {row['precision']} {'compile' if row['compile'] else 'eager'}"
        if "error" in row:
            line("train", what, f"ERROR {row['error'][:150]}")
            continue
        memory = "-" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.1f} GiB"
        breaks = f", graph breaks {row['graph_breaks']['count']}" if row["compile"] else ""
        line("train", what, f"{row['audio_seconds_per_second']:9.1f} audio-s/s, MFU {percent(row['mfu_measured_peak'])} "
             f"of measured / {percent(row['mfu_datasheet'])} of datasheet, peak mem {memory}{breaks}")
    rec = s.get("loader", {})
    if "data_wait_fraction" in rec:
        line("loader", f"{rec['preset']} {rec['precision']} {rec['num_workers']} workers",
             f"data wait {percent(rec['data_wait_fraction'])} of step time, {rec['audio_seconds_per_second']:.1f} audio-s/s")
    rec = s.get("encodec", {})
    if "real_time_factor" in rec:
        line("encodec", f"batch {rec['best_batch']} x {rec['segment_seconds']:g} s",
             f"{rec['real_time_factor']:.1f}x real time (dump path, with decoding: --batch 1 "
             f"{rec['real_time_factor_dump_path']:.1f}x, --batch {rec['best_batch']} "
             f"{rec.get('real_time_factor_dump_path_batched', float('nan')):.1f}x)")
    rec = s.get("kmeans", {})
    if "real_time_factor" in rec:
        line("kmeans", f"{rec['segments']} segments", f"{rec['real_time_factor']:.1f}x real time (dump path, with "
             f"decoding: {rec['real_time_factor_dump_path']:.1f}x)")
    rec = s.get("extract", {})
    if rec.get("clips_per_second"):
        speeds = ", ".join(f"patchout {k}: {v:.2f}" for k, v in rec["clips_per_second"].items())
        line("extract", f"{rec['preset']}, {rec['clips']} clips", f"clips/s {speeds}")
    for name, rec in s.items():
        if "error" in rec:
            line(name, "ERROR", rec["error"][:200])
    lines.append("times: " + ", ".join(f"{name} {rec['seconds']:.0f} s" for name, rec in s.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_out/gpu")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, about a minute")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    args = parser.parse_args(argv)
    started, args.out = time.perf_counter(), os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    os.chdir(ROOT)  # the presets' relative paths
    device = torch.device("cpu") if args.smoke else device_for_rank()
    init_distributed(device)
    plan = SMOKE if args.smoke else FULL
    ctx = {"plan": plan, "device": device, "out": args.out}
    ctx["matmul_peak"] = matmul_peak(device, plan["matmul_size"])
    ctx["datasheet_peak"] = datasheet_flops(device) or None  # None: CPU, or a GPU not in PEAK_TFLOPS
    results = {"smoke": args.smoke, "device": str(device), "device_name": torch.cuda.get_device_name(device)
               if device.type == "cuda" else platform.processor() or "cpu", "torch": torch.__version__,
               "matmul_peak_tflops": ctx["matmul_peak"] / 1e12,
               "datasheet_peak_tflops": ctx["datasheet_peak"] / 1e12 if ctx["datasheet_peak"] else None,
               "sections": {}}
    for name in args.sections.split(","):
        run_section(name, SECTIONS[name], ctx, results)
    results["seconds"] = round(time.perf_counter() - started, 1)
    write_json(args.out, results)
    print(table(results) + f"\ntotal {results['seconds']:.0f} s; figures in {os.path.join(args.out, 'gpu.json')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
