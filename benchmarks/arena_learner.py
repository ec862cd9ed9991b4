"""Cost of the arena's learning game masters on CPU: reply latency and learning time per arm as ratios to the
context-only model, and the memory one more live session takes.

    python benchmarks/arena_learner.py --preset smollm2 [--rounds 5] [--turns 8] [--out FILE.json] [--allow-busy]
    python benchmarks/arena_learner.py --tiny --rounds 1 --allow-busy        # smoke run, a tiny random Llama

Game masters: every model of the preset (configs/arena/NAME.yaml; all `kind: learner`, exactly one `arm: none`,
the context-only baseline). `--tiny` keeps the preset's arms and settings but swaps the weights for a tiny
random Llama built in this process (2 layers, d 64, 4 query / 2 KV heads, a 300-token BPE): for CI and smoke
runs only, its figures say nothing about SmolLM2. Every model runs on the CPU (`--device`), one backend each,
all in this one process.

Measured, all arms in interleaved rounds (benchmarks/timing.py: one warm-up call each, the order rotated per
round, the median over rounds of the per-round ratio to the context-only reply):
- reply: one `LearnerBackend.reply` (the serving path: the session's weights activated, HF generate) to the
  same prompt, turn `--turns` of a scripted campaign session rendered with each arm's `context_turns`, in the
  benchmark's session, with a fixed seed. EOS is suppressed (generation_config.min_new_tokens =
  max_new_tokens), so every arm writes exactly max_new_tokens tokens and the ratio compares equal work.
- learning round (learners only): one `LearnerBackend.sync` that is due exactly one round, i.e. the next
  `learn_every` scripted turns were appended to the session's story: the learner's own path (tokenise the
  turns' text, build AdamW and load the session's optimizer state, `learn_steps` optimizer steps through
  topocl.train.train_steps, copy the weights out, save learner_state/ with fsync). `step_s` = round time /
  learn_steps (so each step carries its share of the round's fixed cost), and `step_ratio` = the per-round
  ratio round / context-only reply, divided by learn_steps: the issue asks for learning time "as a ratio to
  the context-only model", and a reply is the one thing the context-only model does, so a step_ratio of 3
  means one optimizer step costs three context-only replies. Ratios between arms follow by division.

Memory per live session, after the timing, for each arm in turn: a second session goes live (one round is
learned in it, or, for the context-only arm, one reply is written in it). `state_mem` = bytes of the session's
SessionState tensors (trainable weights + AdamW state), `state_disk` = the size of its file in learner_state/.
`rss_peak` = peak RSS during that minus RSS before it; `rss_kept` = RSS after it (freed memory returned to the
OS by malloc_trim) minus RSS before. Both from /proc/self/status (VmHWM, VmRSS), the peak reset first through
/proc/self/clear_refs; not resource.getrusage (ru_maxrss cannot be reset, so it shows only growth above the
process's earlier peak) nor tracemalloc (it does not see torch's CPU allocator). Off Linux they are null.

The JSON (--out) holds the machine (CPUs, 1-min load before / after, torch and transformers versions, torch
threads), the commit and one row per game master; a markdown table is printed. A machine whose 1-minute
load is above --max-load (0.5) per CPU is refused unless --allow-busy: ratios from interleaved rounds stay
meaningful under load, absolute times do not.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from timing import git_commit, interleaved, machine_load, require_idle  # noqa: E402

from topocl.arena.learner import LearnerBackend, SessionState, state_file  # noqa: E402
from topocl.arena.proxies import campaign_world, render_prompt  # noqa: E402
from topocl.arena.serving import ModelSpec, load_specs  # noqa: E402
from topocl.arena.simulate import PLAYER_LINES  # noqa: E402

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "arena"
TIMED, EXTRA = "b" * 32, "c" * 32  # the session timed in every round; the one more session that goes live
REPLY = "The keeper nods and points down the road; the lanterns gutter in the wind."
SEED = 1234


def tiny_llama(path: Path) -> Path:
    """A random 2-layer Llama (d 64, 4 query heads, 2 KV groups so the head split has a group A and B, MLP 128)
    with a 300-token byte-level BPE trained on the campaign player lines, saved as an HF directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator([*PLAYER_LINES, REPLY] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def game_masters(preset: str, tiny: Path | None, device: str) -> list[ModelSpec]:
    """The preset's specs (the tiny model's path instead of theirs with --tiny), all on `device`; the
    context-only model (arm none) first."""
    path = PRESETS / f"{preset}.yaml"
    if not path.is_file():
        raise SystemExit(f"no arena preset {preset!r} ({path})")
    specs = load_specs(path)
    if any(s.kind != "learner" for s in specs) or sum(s.arm == "none" for s in specs) != 1:
        raise SystemExit(f"{path}: needs learners only (kind: learner), exactly one of them with arm: none")
    swap = {"path": str(tiny), "gguf_file": ""} if tiny else {}
    specs = [dataclasses.replace(s, device=device, **swap) for s in specs]
    return sorted(specs, key=lambda s: s.arm != "none")


def script(turns: int) -> list[dict]:
    """A scripted session: `turns` player lines, each with the same committed reply."""
    return [{"player_text": PLAYER_LINES[i % len(PLAYER_LINES)], "reply": REPLY} for i in range(turns)]


def state_bytes(state: SessionState | None) -> int:
    """Bytes of a session's tensors in memory: trainable weights and every tensor of the AdamW state."""
    if state is None:
        return 0
    tensors = list(state.weights.values())
    for per_param in (state.optim or {}).get("state", {}).values():
        tensors += [v for v in per_param.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _proc_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _settle() -> None:
    """Collect garbage and give freed heap back to the OS (glibc), so RSS counts memory in use."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def one_more_session(b: LearnerBackend, stories: dict, prompt: str) -> dict:
    """Memory when session EXTRA goes live beside TIMED: one learning round in it (learners) or one reply."""
    _settle()
    before, resettable = _proc_kib("VmRSS"), _reset_peak()
    if b.spec.learns:
        stories[EXTRA] = script(b.spec.learn_every)
        if b.sync(EXTRA) != 1:
            raise RuntimeError(f"{b.spec.name}: the extra session did not learn one round")
    else:
        b.reply(prompt, SEED, EXTRA)
    peak = _proc_kib("VmHWM") if resettable else None
    _settle()
    after = _proc_kib("VmRSS")
    path = state_file(b.root, EXTRA, b.spec.name)
    row = {"state_mem": state_bytes(b.live.get(EXTRA)), "state_disk": path.stat().st_size if path.is_file() else 0,
           "rss_peak": peak - before if peak is not None and before is not None else None,
           "rss_kept": after - before if after is not None and before is not None else None}
    b.end(EXTRA)
    return row


def measure(specs: list[ModelSpec], rounds: int, turns: int, state_dir: Path) -> list[dict]:
    """Interleaved reply and learning-round timings, then the memory of one more session, per game master."""
    world = campaign_world(SEED, sessions=turns + 2 * rounds + 4, every=2)
    history = script(turns)
    backends, stories, rows = {}, {}, {}
    for s in specs:
        t0 = time.perf_counter()
        b = LearnerBackend(s)
        b._load()
        b.hf.generation_config.min_new_tokens = s.max_new_tokens  # equal work: no early EOS
        b.root = state_dir  # synchronous learning, no worker thread (as topocl.arena.simulate does)
        stories[s.name] = {TIMED: []}
        b.story = lambda sid, st=stories[s.name]: (world, SEED, st[sid])
        backends[s.name] = b
        rows[s.name] = {"name": s.name, "arm": s.arm, "load_s": time.perf_counter() - t0,
                        "trainable_params": sum(b.base[n].numel() for n in b.names),
                        "learn_every": s.learn_every, "learn_steps": s.learn_steps if s.learns else 0,
                        "max_new_tokens": s.max_new_tokens, "context_turns": s.context_turns}
    prompts = {s.name: render_prompt(world, history, PLAYER_LINES[turns % len(PLAYER_LINES)], turns, s.context_turns)
               for s in specs}

    def reply(b: LearnerBackend, prompt: str):
        return lambda: b.reply(prompt, SEED, TIMED)

    def learn(b: LearnerBackend, story: list[dict]):
        def run() -> None:
            story.extend(script(b.spec.learn_every))  # exactly one round is now due
            if b.sync(TIMED) != 1:
                raise RuntimeError(f"{b.spec.name}: sync ran no round")
        return run

    fns = {}
    for s in specs:
        fns[f"reply:{s.name}"] = reply(backends[s.name], prompts[s.name])
        if s.learns:
            fns[f"learn:{s.name}"] = learn(backends[s.name], stories[s.name][TIMED])
    res = interleaved(fns, f"reply:{specs[0].name}", rounds)
    for s in specs:
        r, row = res[f"reply:{s.name}"], rows[s.name]
        row.update(reply_ms=r["ms"], reply_ratio=r["ratio"], reply_ratio_min=r["ratio_min"],
                   reply_ratio_max=r["ratio_max"], round_s=None, step_s=None, step_ratio=None)
        if s.learns:
            lr = res[f"learn:{s.name}"]
            row.update(round_s=lr["ms"] / 1000, step_s=lr["ms"] / 1000 / s.learn_steps,
                       step_ratio=lr["ratio"] / s.learn_steps, step_ratio_min=lr["ratio_min"] / s.learn_steps,
                       step_ratio_max=lr["ratio_max"] / s.learn_steps)
    for s in specs:
        rows[s.name].update(one_more_session(backends[s.name], stories[s.name], prompts[s.name]))
    return list(rows.values())


def mib(x: int | None) -> str:
    return "–" if x is None else f"{x / 2**20:.2f}"


def table(rows: list[dict]) -> str:
    lines = ["| game master | arm | reply ms | x context-only | round s | s / step | step x context-only reply "
             "| state MiB (memory) | state MiB (disk) | RSS peak +MiB | RSS kept +MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        learn = ("–", "–", "–") if r["round_s"] is None else (
            f"{r['round_s']:.3f}", f"{r['step_s']:.3f}", f"{r['step_ratio']:.2f}")
        lines.append(f"| {r['name']} | {r['arm']} | {r['reply_ms']:.1f} | {r['reply_ratio']:.2f} | "
                     f"{' | '.join(learn)} | {mib(r['state_mem'])} | {mib(r['state_disk'])} | "
                     f"{mib(r['rss_peak'])} | {mib(r['rss_kept'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="smollm2", help="configs/arena/NAME.yaml (default smollm2)")
    ap.add_argument("--tiny", action="store_true", help="the preset's arms on a tiny random Llama (smoke, CI)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (after one warm-up)")
    ap.add_argument("--turns", type=int, default=8, help="the timed reply answers turn T of a scripted session")
    ap.add_argument("--device", default="cpu", help="cpu (what the issue asks), or auto / cuda")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", help="write the figures (machine, commit, rows) to this JSON file")
    ap.add_argument("--max-load", type=float, default=0.5, help="idle = 1-min load <= this per CPU")
    ap.add_argument("--allow-busy", action="store_true", help="measure on a busy machine (ratios only)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.turns < 1:
        raise SystemExit("--rounds and --turns must be >= 1")
    before = require_idle(args.max_load, args.allow_busy)
    commit = git_commit()  # of the code measured
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="arena-bench-") as tmp:
        tiny = tiny_llama(Path(tmp) / "tiny-llama") if args.tiny else None
        specs = game_masters(args.preset, tiny, args.device)
        rows = measure(specs, args.rounds, args.turns, Path(tmp) / "learner_state")
    after = machine_load()
    import transformers

    model = "tiny random Llama (smoke only)" if args.tiny else f"preset {args.preset}"
    result = {"commit": commit, "model": model, "preset": args.preset, "tiny": args.tiny, "device": args.device,
              "rounds": args.rounds, "turns": args.turns,
              "machine": {"cpus": before["cpus"], "load_before": before, "load_after": after,
                          "torch": torch.__version__, "transformers": transformers.__version__,
                          "threads": torch.get_num_threads(), "platform": platform.platform()},
              "rows": rows}
    busy = "" if before["idle"] else "; BUSY MACHINE (--allow-busy): ratios only"
    print(f"{model}, commit {commit}, {args.device}, {torch.get_num_threads()} threads, {args.rounds} interleaved "
          f"rounds; 1-min load {before['load1']:.2f} before, {after['load1']:.2f} after, "
          f"{before['cpus']:.0f} CPUs{busy}\n")
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
