"""One rank of the multi-process tests (run by test_distributed.py, not by pytest).

    python dist_worker.py save URI RANK WORLD STEP [store|torch] [KILL_AFTER_MS] [BIG]
    python dist_worker.py load URI RANK WORLD
"""

import os
import signal
import sys
import threading

import numpy as np

import cairn
from _leave import leave  # beside this file


def reference():
    return {
        "rows": np.arange(8 * 6, dtype=np.float32).reshape(8, 6),
        "cols": np.arange(4 * 8, dtype=np.int32).reshape(4, 8),
        "rep": np.linspace(0, 1, 5),
    }


def split(length, parts, i):
    lo, hi = length * i // parts, length * (i + 1) // parts
    return lo, hi - lo


def rank_state(rank, world, big=False):
    ref = reference()
    lo, n = split(8, world, rank)
    state = {
        "model": {
            "rows": cairn.Piece(ref["rows"][lo : lo + n], offsets=(lo, 0), global_shape=(8, 6)),
            "cols": cairn.Piece(ref["cols"][:, lo : lo + n], offsets=(0, lo), global_shape=(4, 8)),
            "rep": ref["rep"],
        },
        "step": 7 if rank == 0 else -1,
    }
    if big:  # slow this rank's writes down so that it can be killed in the middle
        state["model"]["big"] = cairn.Piece(np.ones((world, 16 << 20), np.uint8)[rank : rank + 1], offsets=(rank, 0), global_shape=(world, 16 << 20))
    return state


def main():
    mode, uri, rank, world = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if mode == "save":
        step = int(sys.argv[5])
        coord = sys.argv[6] if len(sys.argv) > 6 else "store"
        kill_after = int(sys.argv[7]) if len(sys.argv) > 7 else -1
        big = len(sys.argv) > 8 and sys.argv[8] == "big"
        all_gather = None
        if coord == "torch":
            import torch.distributed as dist

            dist.init_process_group("gloo", init_method=os.environ["CAIRN_TEST_INIT"], rank=rank, world_size=world)
            all_gather = cairn.torch_all_gather()
        if kill_after >= 0:
            threading.Timer(kill_after / 1000, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
        try:
            info = cairn.save(uri, rank_state(rank, world, big), step=step, rank=rank, world_size=world,
                              all_gather=all_gather, timeout=float(os.environ.get("CAIRN_TEST_TIMEOUT", "60")))
            print(f"committed {info.save_id}", flush=True)
        except cairn.CheckpointError as e:
            print(f"failed {type(e).__name__}: {e}", flush=True)
            sys.exit(3)
        finally:
            if coord == "torch":
                # Without this, gloo's threads can abort the interpreter's exit.
                import torch.distributed as dist

                dist.destroy_process_group()
    else:
        ref = reference()
        lo, n = split(8, world, rank)
        state = cairn.load(uri, boxes={"model.rows": ((lo, 0), (n, 6)), "model.cols": ((0, lo), (4, n))})
        assert state["model"]["rows"].tobytes() == ref["rows"][lo : lo + n].tobytes()
        assert state["model"]["cols"].tobytes() == np.ascontiguousarray(ref["cols"][:, lo : lo + n]).tobytes()
        assert state["model"]["rep"].tobytes() == ref["rep"].tobytes()
        assert state["step"] == 7
        print("ok", flush=True)


if __name__ == "__main__":
    main()
    leave()
