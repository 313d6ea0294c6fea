"""The quality bar for `grumpy train`: a PyTorch GRU language model on the same data.

Trains torch.nn.GRU (embedding -> GRU stack -> linear head) on grumpy's shipped
corpus with grumpy's own split, batcher and validation procedure (the whole
validation split, 32 streams with the state carried), for a wall-time budget,
and prints the best validation loss reached by each checkpoint time. Time spent
evaluating is not counted against torch's budget, which favours torch.

    python benchmarks/torch_lm.py --minutes 5

Its settings default to `grumpy train`'s own (``grumpy.lm.TrainConfig``): the same
architecture, dropout (between the layers and on the head's input) and weight drop, window, batch,
optimiser (AdamW, decay 0.1) and rate, clipping and cosine schedule with warm-up, the schedule's progress being
the share of the last ``--minutes`` mark used.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from grumpy.lm.config import RUN_WEIGHT_DECAY, TrainConfig
from grumpy.lm.data import StreamBatcher, Vocab, eval_windows, load_text, split_text
from grumpy.optim import lr_at


class TorchCharModel(torch.nn.Module):
    def __init__(self, V: int, E: int, H: int, L: int, dropout: float, weight_drop: float) -> None:
        super().__init__()
        self.weight_drop = weight_drop
        self.embedding = torch.nn.Embedding(V, E)
        self.gru = torch.nn.GRU(E, H, L, dropout=dropout)
        self.drop = torch.nn.Dropout(dropout)  # on the head's input too, as grumpy's CharModel
        self.head = torch.nn.Linear(H, V)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embedding(x)
        if self.training and self.weight_drop > 0:  # grumpy's weight drop: one mask per forward on W_hh
            w = {n: torch.nn.functional.dropout(p, self.weight_drop) if n.startswith("weight_hh") else p
                 for n, p in self.gru.named_parameters()}
            out, h = torch.func.functional_call(self.gru, w, (x, h))
        else:
            out, h = self.gru(x, h)
        return self.head(self.drop(out)), h


@torch.no_grad()
def val_loss(model: TorchCharModel, ids: np.ndarray) -> float:
    model.eval()
    total, count, h = 0.0, 0, None
    for x, y, reset in eval_windows(ids, 32, 100):
        if reset or h is None:
            h = None
        elif x.shape[1] != h.shape[1]:
            h = h[:, -1:].contiguous()
        logits, h = model(torch.from_numpy(x).long(), h)
        lp = torch.log_softmax(logits.double(), -1)
        total -= lp.gather(-1, torch.from_numpy(y).long()[..., None]).sum().item()
        count += y.size
    model.train()
    return total / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainConfig()
    p.add_argument("--minutes", type=float, nargs="+", default=[5], help="report the best loss by these times")
    p.add_argument("--hidden-size", type=int, default=d.hidden_size)
    p.add_argument("--num-layers", type=int, default=d.num_layers)
    p.add_argument("--embedding-dim", type=int, default=d.embedding_dim)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--weight-drop", type=float, default=d.weight_drop)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--optimizer", choices=("adam", "adamw"), default=d.optimizer)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="default: grumpy train's for the optimiser (RUN_WEIGHT_DECAY)")
    p.add_argument("--schedule", choices=("cosine", "constant"), default=d.schedule)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--clip-norm", type=float, default=d.clip_norm)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    text = load_text(None)
    vocab = Vocab.from_text(text)
    train_ids, val_ids = split_text(vocab.encode(text))
    batches = StreamBatcher(train_ids, args.batch_size, args.seq_len, seed=args.seed)
    model = TorchCharModel(len(vocab), args.embedding_dim, args.hidden_size, args.num_layers, args.dropout,
                           args.weight_drop)
    # torch's Adam adds the decay to the gradient and AdamW decays the weights, as grumpy's do
    decay = RUN_WEIGHT_DECAY[args.optimizer] if args.weight_decay is None else args.weight_decay
    opt = (torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam)(model.parameters(), lr=args.lr,
                                                                                  weight_decay=decay)

    marks = sorted(m * 60 for m in args.minutes)
    best, trained_s, step, h = math.inf, 0.0, 0, None
    report: dict[str, float] = {}
    while marks:
        # Train until the next evaluation is due or the next reporting time is reached.
        t0 = time.perf_counter()
        for _ in range(args.eval_every):
            x, y, new_epoch = batches.next()
            if new_epoch:
                h = None
            logits, h = model(torch.from_numpy(x).long(), h)
            h = h.detach()
            target = torch.from_numpy(y).long().reshape(-1)
            progress = (trained_s + time.perf_counter() - t0) / (60 * args.minutes[-1])
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args.lr, schedule=args.schedule, warmup_steps=args.warmup_steps,
                                    progress=min(progress, 1.0), min_ratio=args.min_lr_ratio)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, len(vocab)), target)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_norm)
            opt.step()
            step += 1
            if trained_s + time.perf_counter() - t0 >= marks[0]:
                break
        trained_s += time.perf_counter() - t0
        best = min(best, val_loss(model, val_ids))
        print(json.dumps({"step": step, "train_s": round(trained_s, 1), "best_val_loss": round(best, 4),
                          "best_val_bpc": round(best / math.log(2), 4)}), flush=True)
        if trained_s >= marks[0]:
            report[f"{marks.pop(0) / 60:g} min"] = round(best, 4)
    print(json.dumps({"best_val_loss_by": report, "config": vars(args)}))


if __name__ == "__main__":
    main()
