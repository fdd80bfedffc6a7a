"""Tensor-parallel sampling: a toy language model whose LM head is split by vocabulary across
gloo processes (as in Megatron or vLLM), sampled without ever gathering the logits.

Every rank holds the rows of the output projection for its slice of the vocabulary, computes
its slice of the logits and calls ``khot.distributed.sharded_sample``, which gathers only each
rank's top-k candidates and returns the same token on every rank. The script launches its own
ranks (``--ranks`` local processes on 127.0.0.1) and checks, on rank 0 which here can afford the
whole head, that every token lies in the top k of the full logits.

    python examples/tp_sampling.py            # vocabulary 128256, 2 ranks, 16 tokens for 4 prompts
    python examples/tp_sampling.py --tiny     # a few seconds
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys

import torch
import torch.distributed as dist

import khot
import khot.distributed as kd


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small vocabulary and few steps (seconds)")
    parser.add_argument("--ranks", type=int, default=2, help="tensor-parallel processes")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--steps", type=int, default=16, help="tokens to sample per prompt")
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--timeout", type=float, default=300, help="seconds before the ranks are killed")
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)  # set by the launcher
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return parser


def _model(vocab: int, width: int):
    """A toy recurrent LM, the same on every rank (one seed): embedding, recurrence, LM head."""
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(vocab, width, generator=g)
    recur = torch.randn(width, width, generator=g) / width**0.5
    head = torch.randn(vocab, width, generator=g)
    return embed, recur, head


def _rank(args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank, world_size=args.ranks)
    try:
        vocab, width, prompts = (1000, 16, 2) if args.tiny else (args.vocab, 64, 4)
        steps = 4 if args.tiny else args.steps
        embed, recur, head = _model(vocab, width)
        mine = head.chunk(args.ranks)[args.rank]  # this rank's slice of the vocabulary-parallel head
        generator = torch.Generator().manual_seed(1234)
        tokens = torch.arange(prompts)  # one-token prompts
        hidden = torch.zeros(prompts, width)
        out, in_top_k = [], True
        for _ in range(steps):
            hidden = torch.tanh(hidden @ recur + embed[tokens])
            logits = hidden @ mine.T  # (prompts, vocab / ranks): this rank's logits only
            tokens = kd.sharded_sample(logits, k=args.k, top_p=args.top_p, temperature=args.temperature, generator=generator)
            out.append(tokens)
            if args.rank == 0:  # the check: the whole head is affordable here
                chosen = khot.topk_mask(hidden @ head.T, args.k).gather(-1, tokens.unsqueeze(-1))
                in_top_k &= bool(chosen.all())
        sequences = torch.stack(out, -1)
        gathered = [torch.empty_like(sequences) for _ in range(args.ranks)]
        dist.all_gather(gathered, sequences)
        if args.rank == 0:
            same = all(torch.equal(g, sequences) for g in gathered)
            candidates = prompts * min(args.k, vocab // args.ranks + 1) * (4 + 8) * args.ranks
            print(json.dumps({
                "tokens": sequences.tolist(),
                "same_on_every_rank": same,
                "in_top_k_of_full_logits": in_top_k,
                "bytes_gathered_per_step": candidates,
                "bytes_of_full_logits_per_step": prompts * vocab * 4,
            }))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.rank is not None:
        return _rank(args)
    port = _free_port()
    ranks = [
        subprocess.Popen(
            [sys.executable, __file__, *argv, "--rank", str(r), "--port", str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for r in range(args.ranks)
    ]
    try:
        outputs = [p.communicate(timeout=args.timeout) for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
    for r, (p, (_, err)) in enumerate(zip(ranks, outputs)):
        if p.returncode:
            raise RuntimeError(f"rank {r} failed (exit code {p.returncode}):\n{err[-3000:]}")
    result = json.loads(outputs[0][0].strip().splitlines()[-1])
    print(f"{args.ranks} ranks, each with 1/{args.ranks} of the LM head; top-k {args.k}, top-p {args.top_p}")
    for prompt, tokens in enumerate(result["tokens"]):
        print(f"  prompt {prompt}: {tokens}")
    print(f"same tokens on every rank: {result['same_on_every_rank']}; "
          f"every token in the top {args.k} of the full logits: {result['in_top_k_of_full_logits']}")
    print(f"gathered per step: {result['bytes_gathered_per_step']:,} bytes of candidates "
          f"(the full logits: {result['bytes_of_full_logits_per_step']:,} bytes)")
    return result


if __name__ == "__main__":
    main()
