"""Plain-PyTorch baseline of `npm run bench:filters`: the top-k and top-p sampling filters as
x-transformers defines them (torch.topk + scatter; sort, softmax, cumsum, shifted mask, scatter),
timed on [rows, vocab] standard-normal logits. Prints one JSON line per case:
{"filter", "vocab", "rows", "ms", "torch"}. Threads: --threads N (default 1)."""
import argparse
import json
import math
import time

import torch


def top_k(logits, frac=0.1):
    k = math.ceil(frac * logits.shape[-1])
    val, ind = torch.topk(logits, k)
    out = torch.full_like(logits, float('-inf'))
    out.scatter_(1, ind, val)
    return out


def top_p(logits, thres=0.9):
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cum = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
    remove = torch.nn.functional.pad(cum > thres, (1, -1), value=False)
    sorted_logits[remove] = float('-inf')
    return sorted_logits.scatter(1, sorted_indices, sorted_logits)


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--rows', type=int, default=8)
    p.add_argument('--vocabs', default='256,32000,100277')
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    for name, fn in (('topK', top_k), ('topP', top_p)):
        for v in (int(x) for x in a.vocabs.split(',')):
            x = torch.randn(a.rows, v)
            for _ in range(3):
                fn(x)
            n = max(1, 2_000_000 // (a.rows * v))
            best = float('inf')
            for _ in range(7):
                t0 = time.perf_counter()
                for _ in range(n):
                    fn(x)
                best = min(best, (time.perf_counter() - t0) / n)
            print(json.dumps({'filter': name, 'vocab': v, 'rows': a.rows, 'ms': best * 1000, 'torch': torch.__version__}))


if __name__ == '__main__':
    main()
