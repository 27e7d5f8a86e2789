"""What restarting an LSTM's stream state costs (stateful layout): a newly adopted peer snapshot, a resume.

    .venv/bin/python bench/lm_state_restart.py --data DIR [--manifest commoncrawl-tiny] [--train-steps 300]

Trains one model (plain torch, Adam, the manifest's model and streams) on group 0's
stateful streams for `--train-steps` windows, then runs it frozen over the next
`--windows` windows three ways: state carried on (what the model would predict with its
real history), restarted from zero, and restarted from zero plus one warm-up pass over
the previous window (`model.restart: warmup`). Reported per window after the restart:
the cross-entropy against the data (nats/token) and the KL from the carried prediction
to the restarted one (how wrong a peer's distillation target is right after adoption),
plus the warm-up's time as a fraction of one training step, all measured in this run.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
import torch.nn.functional as F

from codistill.config import CodistillConfig, load_experiment
from codistill.dataset import check_shards_present, load_manifest
from training.data import StreamSpec, to_torch
from training.loss import codistillation_loss
from training.train import make_optimizer
from training.workloads import lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a commoncrawl dataset directory")
    parser.add_argument("--manifest", default="commoncrawl-tiny")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--windows", type=int, default=4, help="windows measured after the restart")
    parser.add_argument("--restarts", type=int, default=8, help="restart points measured (one every 2 windows)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_experiment(args.manifest, [f"data.output={args.data}", "model.restart=warmup", *args.sets])
    dataset = load_manifest(args.data)
    check_shards_present(args.data, dataset)
    spec = StreamSpec(args.data, dataset, tuple(dataset.shards_of("train", 0)), config.deepspeed.micro_batch_size,
                      repeat=True)
    facts = lm.tokenizer_facts(dataset)
    streams = iter(lm.TokenStreams(spec, config.model.window, int(facts["pad_id"]), history=True))

    torch.manual_seed(0)
    model = lm.build_model(config.model, dataset)
    optimizer = make_optimizer(model.parameters(), config.optimizer)
    state, step_seconds = None, []
    for step in range(args.train_steps):
        batch = to_torch(next(streams))
        start = time.perf_counter()
        logits, state = lm.forward(model, batch, state)
        targets, mask = lm.targets(batch)
        codistillation_loss(logits, targets, [], step, CodistillConfig(), binary=False, mask=mask).total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - start)
        if (step + 1) % 100 == 0:
            print(f"trained {step + 1} windows, last label loss "
                  f"{F.cross_entropy(logits[mask], targets[mask]).item():.3f} nats/token", flush=True)

    model.eval()
    ce = {k: [[] for _ in range(args.windows)] for k in ("carried", "zero", "warmup")}
    kl = {k: [[] for _ in range(args.windows)] for k in ("zero", "warmup")}
    warmup_seconds = []
    with torch.no_grad():
        for _ in range(args.restarts):
            batches = [to_torch(b) for b in itertools.islice(streams, args.windows + 2)]
            _, state = lm.forward(model, batches[0], state)
            _, state = lm.forward(model, batches[1], state)  # the window just before the restart
            states = {"carried": state, "zero": None, "warmup": None}
            for i, batch in enumerate(batches[2:]):
                targets, mask = lm.targets(batch)
                outputs = {}
                for kind in states:
                    view = dict(batch)
                    if kind == "zero" or i > 0:
                        view.pop("history")  # zero: never warm up; after the first window the state is carried
                    start = time.perf_counter()
                    outputs[kind], states[kind] = lm.forward(model, view, states[kind])
                    if kind == "warmup" and i == 0:
                        warmup_seconds.append(time.perf_counter() - start)
                    ce[kind][i].append(F.cross_entropy(outputs[kind][mask], targets[mask]).item())
                reference = F.log_softmax(outputs["carried"][mask], -1)
                for kind in kl:
                    kl[kind][i].append(F.kl_div(F.log_softmax(outputs[kind][mask], -1), reference,
                                                log_target=True, reduction="batchmean").item())
            state = states["carried"]

    print(f"\n{config.model.layers} x {config.model.hidden} LSTM, {config.deepspeed.micro_batch_size} streams x "
          f"{config.model.window} tokens; {args.restarts} restarts, mean over them")
    print(f"{'window after restart':<22}" + "".join(f"{i:>10}" for i in range(args.windows)))
    for kind in ce:
        print(f"{'CE ' + kind:<22}" + "".join(f"{statistics.mean(v):>10.4f}" for v in ce[kind]))
    for kind in kl:
        print(f"{'KL(carried||' + kind + ')':<22}" + "".join(f"{statistics.mean(v):>10.4f}" for v in kl[kind]))
    step = statistics.median(step_seconds[len(step_seconds) // 2:])
    # warmup_seconds timed the warm-up pass plus the window's own forward; subtract a plain forward's share
    print(f"\nwarm-up forward (history + window, no grad) {1000 * statistics.median(warmup_seconds):.1f} ms vs "
          f"training step {1000 * step:.1f} ms: x{statistics.median(warmup_seconds) / step:.2f} of a step, "
          f"once per adoption (every codistill.exchange_every = {config.codistill.exchange_every} steps)")


if __name__ == "__main__":
    main()
