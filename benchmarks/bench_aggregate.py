"""Server aggregation cost as the federation grows (run under mpirun; driven by bench_comm.py).

Every learner hands the server a model of N float32 parameters at the given sparsity; the server
aggregates it the way the trainer does for the named algorithm: the sum of pre-weighted values under a
shared mask (fedsparsify-global, and every algorithm the table gives a shared mask), or Gatherv of encoded
models + streaming majority vote (fedsparsify-local). Prints one JSON line from rank 0: seconds per round in
the collective and in aggregation, and the server's peak resident memory (the same start-up work at every
size, so growth with the number of learners is what aggregation holds).
"""

import json
import resource
import sys
import time

import numpy as np

from fedmpi import encoding, pruning
from fedmpi.aggregation import MajorityVote
from fedmpi.algorithms import ALGORITHMS
from fedmpi.wire import Wire


def rss_mb() -> float:
    """This process's peak resident memory in MB (ru_maxrss counts kB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(n: int, sparsity: float, variant: str, rounds: int = 3) -> None:
    """`variant`: an algorithm of fedmpi.algorithms; its table entry says which path the server takes."""
    shared_mask = ALGORITHMS[variant].shared_mask
    wire = Wire()
    rng = np.random.default_rng(wire.rank)
    shared = pruning.magnitude_mask(np.random.default_rng(0).standard_normal(n).astype(np.float32), sparsity)
    nnz = int(shared.sum())
    comm_s = agg_s = 0.0
    for _ in range(rounds):
        wire.barrier()
        t0 = time.perf_counter()
        if shared_mask:
            if wire.is_server:
                summed = wire.reduce_sum(np.zeros(nnz, np.float32))
                t1 = time.perf_counter()
                encoding.scatter_values(summed, shared, np.float32)
            else:
                values = rng.standard_normal(n).astype(np.float32)
                wire.reduce_sum(encoding.gather_values(values, shared) / np.float32(wire.learners))
        else:
            if wire.is_server:
                payloads = wire.gatherv(None)
                t1 = time.perf_counter()
                vote = MajorityVote(n)
                for buf in payloads:
                    v, m = encoding.decode(buf, expected_n=n)
                    vote.add(v, m, 1.0)
                vote.result()
            else:
                values = pruning.apply_mask(rng.standard_normal(n).astype(np.float32), shared)
                local = pruning.magnitude_mask(values, min(0.999, sparsity + 0.02), shared)
                wire.gatherv(encoding.encode(pruning.apply_mask(values, local), local))
        if wire.is_server:
            comm_s += t1 - t0
            agg_s += time.perf_counter() - t1
    if wire.is_server:
        print(
            json.dumps(
                {
                    "learners": wire.learners,
                    "variant": variant,
                    "parameters": n,
                    "sparsity": sparsity,
                    "seconds_collective": comm_s / rounds,
                    "seconds_aggregate": agg_s / rounds,
                    "server_peak_mb": rss_mb(),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3])
