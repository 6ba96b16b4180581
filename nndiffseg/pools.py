"""Process pools that one Ctrl-C or SIGTERM stops within seconds (prediction's exports, nnU-Net's planning)."""
import multiprocessing
import multiprocessing.pool
import signal
import threading

# the longest a pool's shutdown may take before its workers are killed
POOL_STOP_TIMEOUT_S = 3.0


class StoppablePool(multiprocessing.pool.Pool):
    """A Pool whose terminate(), also what leaving ``with`` does, cannot hang (stop_pool)."""

    def terminate(self) -> None:
        stop_pool(self)


def quiet_pool(num_processes: int) -> StoppablePool:
    """A spawn pool whose workers leave Ctrl-C to the main process, which ends them: they would otherwise die
    mid-task, mid-import with a traceback, or part-way through sending a result. SIGINT is ignored while they
    start: an ignored signal stays ignored in a spawned interpreter from its first instruction."""
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal.signal works only there
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main_thread else None
    try:
        return StoppablePool(num_processes, context=multiprocessing.get_context("spawn"))
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, handler)


def stop_pool(pool: multiprocessing.pool.Pool, timeout: float = POOL_STOP_TIMEOUT_S) -> None:
    """Pool.terminate, bounded. It blocks for good on a queue's lock that a worker holds (one that died or is
    stuck mid-start or mid-send), and on a result that a worker, stopped by SIGTERM or Ctrl-C, sent only in part
    (the pool's result thread waits for the rest). After ``timeout`` the workers are killed and the pool's own
    shutdown is abandoned."""
    stopper = threading.Thread(target=lambda: (multiprocessing.pool.Pool.terminate(pool), pool.join()), daemon=True)
    stopper.start()
    stopper.join(timeout)
    if stopper.is_alive():
        for worker in multiprocessing.active_children():
            worker.kill()
            worker.join(timeout)
