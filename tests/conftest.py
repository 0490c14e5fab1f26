import os
import sys

import pytest
import torch

# Under pytest-xdist (-n N) the N workers share the cores: each worker, and every script a test starts,
# takes its part of them instead of all (N x all threads would contend and spin-wait).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _workers))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a test module: tiny tensors gain nothing from threads, and on a busy machine
    idle OpenMP threads spin-wait for seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Ran:
    """What a finished script left: returncode, stdout, stderr (as subprocess.CompletedProcess)."""

    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_main(script, *args):
    """`python script args` without starting Python and torch again (about 2 s a run): the script's
    main() in this process, through plumbing.run as its command line runs it, with stdout and stderr
    captured and a traceback written to stderr as the interpreter would. -> Ran. Each script still has
    tests that start it as a real process (help, torchrun, damaged checkpoints)."""
    import contextlib
    import importlib
    import io
    import traceback
    import warnings

    import plumbing
    module = importlib.import_module(os.path.splitext(os.path.basename(str(script)))[0])
    out, err, code, threads = io.StringIO(), io.StringIO(), 0, torch.get_num_threads()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("default")  # each run warns afresh, as a new process would
        try:
            plumbing.run(lambda: module.main([str(a) for a in args]))
        except SystemExit as e:
            code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except Exception:
            traceback.print_exc()
            code = 1
        finally:
            torch.set_num_threads(threads)  # a --threads option must not outlive its run
    return Ran(code, out.getvalue(), err.getvalue())
