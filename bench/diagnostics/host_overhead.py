"""Host overhead of one decode pass: the engine's own Python work, the model's forward excluded.

    python -m bench.diagnostics.host_overhead                       # CPU, plain/ngram/adaptive, batch 1 and 8
    python -m bench.diagnostics.host_overhead --profile 25          # plus the top 25 functions by tottime
    python -m bench.diagnostics.host_overhead --device cuda         # on a GPU (the forward is synchronised
                                                        # inside the timing wrapper, see below)
    cd OTHER_CHECKOUT && python -m bench.diagnostics.host_overhead   # other code, same machine
    python -m bench.diagnostics.host_overhead --device cuda --shape-dir DIR --modes plain,ngram
        # random bf16 weights in the shape of DIR/config.json with DIR's tokenizer (e.g. a
        # SmolLM2-135M directory): the real forward cost; add --compile --no-sync-forward
        # for tokens/s as served

Builds a tiny random Llama (testkit/tiny_model.py, saved with save_tiny_model and
loaded through service.models.loading.load_model, as the service tests do; no EOS, so every
request runs to --new-tokens), and drives the real Engine (its own thread) with batch 1 and
batch 8 of plain (Method.NONE), n-gram (fixed k) and adaptive n-gram requests.

What is timed, per engine step (Engine.add_pass_observer's PassRecord.total_s): its wall time
with time.perf_counter, and the time spent inside ModelRunner.forward (wrapped). Steps that
admitted or prefilled a request (docs/prefill.md) are left out, so the figure is the steady state:

    host us per pass = (turn time - forward time) / decode passes

The model is so small that the forward is cheap, but it is excluded anyway. On CUDA the
forward wrapper synchronises after the forward (only in this bench), so the wait for the
GPU lands in the forward's share, not in the host's; what follows the forward (the
verification's kernel launches and their short GPU latency before the verdicts reach the
host) stays in the host's share. With --no-sync-forward, "host" is the whole pass but the
forward's launch.

--profile N runs cProfile on the engine thread (from one step's end to the next, disabled
while a forward runs; read once the engine has stopped) and lists the top N functions by
tottime. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from service.engine import Engine, EngineConfig, FinalResult, GenerationRequest, Method
from service.engine.execution.runner import ModelRunner
from service.engine.pass_record import PassRecord
from service.models.loading import load_model
from specdec_common.logging_setup import configure_logging
from testkit.tiny_model import CORPUS, save_tiny_model

REPO = str(Path(__file__).resolve().parents[2])

MODES = {
    "plain": dict(method=Method.NONE, adaptive=False),
    "ngram": dict(method=Method.NGRAM, adaptive=False),
    "adaptive": dict(method=Method.NGRAM, adaptive=True),
}


class Meter:
    """Counts and times engine-loop turns, forwards and decode passes (engine thread only)."""

    def __init__(self, sync_forward: bool) -> None:
        self.sync_forward = sync_forward
        self.profile: cProfile.Profile | None = None
        self.reset()

    def reset(self) -> None:
        self.turn_s: list[float] = []  # steady-state turns: wall time
        self.turn_forward_s: list[float] = []  # ... of which inside ModelRunner.forward
        self.passes = 0  # decode passes in steady-state turns
        self._forward_s = 0.0

    def install(self) -> None:
        """Times (and with sync_forward synchronises) ModelRunner.forward, in every engine."""
        meter = self
        forward = ModelRunner.forward

        def timed_forward(runner, *args, **kwargs):
            if meter.profile is not None:
                meter.profile.disable()
            t0 = time.perf_counter()
            out = forward(runner, *args, **kwargs)
            if meter.sync_forward:
                torch.cuda.synchronize()
            meter._forward_s += time.perf_counter() - t0
            if meter.profile is not None:
                meter.profile.enable()
            return out

        ModelRunner.forward = timed_forward

    def observe(self, record: PassRecord) -> None:
        """An Engine pass observer (engine thread): a step that admitted or prefilled a
        request is not steady state. The profile, when on, runs from one step's end to the
        next's."""
        if self.profile is not None:
            self.profile.disable()
        if record.rows and not record.admitted and not record.prefill_rows:
            self.turn_s.append(record.total_s)
            self.turn_forward_s.append(self._forward_s)
            self.passes += 1
        self._forward_s = 0.0
        if self.profile is not None:
            self.profile.enable()


def random_model(shape_dir: str, device: str, dtype: torch.dtype):
    """Random weights in the shape of `shape_dir`'s config.json, with its tokenizer: the real
    forward cost of that model without its weights. No EOS anywhere (requests run to
    --new-tokens)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from service.models.loading import LoadedModel

    config = AutoConfig.from_pretrained(shape_dir)
    config.eos_token_id = None
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)  # the config's own random init
    model = model.to(dtype)
    model.generation_config.eos_token_id = None
    tokenizer = AutoTokenizer.from_pretrained(shape_dir)
    tokenizer.eos_token = None
    return LoadedModel(Path(shape_dir).name, model.eval(), tokenizer, torch.device(device), dtype)


def build_model(device: str, layers: int):
    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_model(Path(tmp), seed=0, layers=layers, with_eos=False, max_position=4096)
        loaded = load_model(str(path), dtype=torch.float32, device=device)
    # As the tests' "loopy" target: attention barely matters, greedy output falls into
    # cycles, so n-gram lookups hit and drafts get accepted (passes verify real drafts).
    with torch.no_grad():
        for layer in loaded.model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.01)
    return loaded


def run_batch(
    engine: Engine, prompt: tuple[int, ...], batch: int, new_tokens: int, method: Method, k: int, tag: str
) -> tuple[int, float]:
    """Submits `batch` requests at once and waits for all; (completion tokens, seconds)."""
    done = threading.Semaphore(0)
    finals: list[FinalResult] = []

    def on_event(event, finals=finals, done=done) -> None:
        if isinstance(event, FinalResult):
            finals.append(event)
            done.release()

    t0 = time.perf_counter()
    for i in range(batch):
        request = GenerationRequest(
            f"{tag}-{i}",
            prompt,
            max_tokens=new_tokens,
            method=method,
            num_draft_tokens=k if method is not Method.NONE else None,
        )
        engine.submit(request, on_event)
    for _ in range(batch):
        if not done.acquire(timeout=600):
            raise TimeoutError(f"{tag}: requests did not finish")
    elapsed = time.perf_counter() - t0
    bad = [f for f in finals if f.error]
    if bad:
        raise RuntimeError(f"{tag}: {bad[0].error}")
    return sum(f.completion_tokens for f in finals), elapsed


def measure(loaded, meter: Meter, mode: str, batch: int, args) -> dict:
    spec = MODES[mode]
    config = EngineConfig(
        max_batch_size=batch,
        default_method=spec["method"],
        default_num_draft_tokens=args.k,
        max_num_draft_tokens=args.k,
        kv_cache_tokens=args.prompt_tokens + args.new_tokens + 64,
        adaptive_draft_length=spec["adaptive"],
        cuda_graphs=args.device == "cuda",
        compile=args.compile,
        instance_id="bench",
    )
    engine = Engine(loaded, config)
    engine.add_pass_observer(meter.observe)
    engine.start()
    text = " ".join(CORPUS)
    ids = tuple(loaded.tokenizer.encode(text, add_special_tokens=False))
    prompt = (ids * (args.prompt_tokens // len(ids) + 1))[: args.prompt_tokens]
    try:
        run_batch(engine, prompt, batch, args.new_tokens, spec["method"], args.k, f"warm-{mode}-{batch}")
        runs = []
        profile = None
        for r in range(args.repeat + (1 if args.profile else 0)):
            profiling = args.profile and r == args.repeat
            meter.reset()
            meter.profile = cProfile.Profile() if profiling else None
            tokens, elapsed = run_batch(
                engine, prompt, batch, args.new_tokens, spec["method"], args.k, f"{mode}-{batch}-{r}"
            )
            if profiling:
                profile, meter.profile = meter.profile, None
                continue
            turns, fwd = sum(meter.turn_s), sum(meter.turn_forward_s)
            runs.append(
                dict(
                    passes=meter.passes,
                    tokens=tokens,
                    pass_us=1e6 * turns / meter.passes,
                    forward_us=1e6 * fwd / meter.passes,
                    host_us=1e6 * (turns - fwd) / meter.passes,
                    wall_s=elapsed,
                )
            )
    finally:
        engine.stop(drain_timeout_s=0)
    profile_text = top_functions(profile, args.profile) if profile is not None else None
    best = min(runs, key=lambda x: x["host_us"])
    out = dict(
        mode=mode,
        batch=batch,
        host_us_per_pass=round(best["host_us"], 1),
        host_us_per_pass_median=round(statistics.median(x["host_us"] for x in runs), 1),
        forward_us_per_pass=round(best["forward_us"], 1),
        tokens_per_s=round(best["tokens"] / best["wall_s"], 1),
        pass_us=round(best["pass_us"], 1),
        passes=best["passes"],
        completion_tokens=best["tokens"],
        runs=[round(x["host_us"], 1) for x in runs],
    )
    if profile_text is not None:
        out["profile_top_tottime"] = profile_text
    return out


def top_functions(profile: cProfile.Profile, n: int) -> list[str]:
    stream = io.StringIO()
    stats = pstats.Stats(profile, stream=stream)
    stats.sort_stats("tottime")
    rows = []
    for func, (_cc, nc, tt, ct, _callers) in sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:n]:
        filename, line, name = func
        where = f"{Path(filename).name}:{line}" if line else filename
        rows.append(f"{tt * 1e3:9.1f} ms tottime {ct * 1e3:9.1f} ms cumtime {nc:7d} calls  {name} ({where})")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--modes", default="plain,ngram,adaptive")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per setting (the best is reported)")
    parser.add_argument("--profile", type=int, default=0, help="list the top N functions by tottime")
    parser.add_argument("--compile", action="store_true", help="CUDA: torch.compile the lean forward")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument(
        "--shape-dir",
        help="random weights in this model directory's shape (config.json, "
        "tokenizer) instead of the tiny model, in --dtype",
    )
    parser.add_argument("--dtype", default="bfloat16", help="with --shape-dir")
    parser.add_argument(
        "--no-sync-forward",
        action="store_true",
        help="CUDA: leave the forward asynchronous (tokens/s as served; host_us then "
        "includes the wait for the GPU)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configure_logging("INFO")  # as the service does (stderr; the engine's debug lines are filtered)
    if args.shape_dir:
        loaded = random_model(args.shape_dir, args.device, getattr(torch, args.dtype))
    else:
        loaded = build_model(args.device, args.layers)
    meter = Meter(sync_forward=args.device == "cuda" and not args.no_sync_forward)
    meter.install()
    results = [
        measure(loaded, meter, mode, int(b), args)
        for mode in args.modes.split(",")
        for b in args.batches.split(",")
    ]
    print(
        json.dumps(
            dict(
                repo=REPO,
                device=args.device if args.device == "cpu" else torch.cuda.get_device_name(),
                model=args.shape_dir or f"tiny random Llama, {args.layers} layer(s)",
                sync_forward=meter.sync_forward,
                torch=torch.__version__,
                new_tokens=args.new_tokens,
                prompt_tokens=args.prompt_tokens,
                k=args.k,
                results=results,
            ),
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
