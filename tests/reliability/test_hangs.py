"""No run can hang: a rank that stalls, or takes another branch than its peers, ends the whole job within
``parallel.timeout_s``, non-zero, with one line that names the rank and the operation it was in."""
import re
import time

import pytest

from collie.distributed.launch import DistributedRunError, run_distributed
from reliability_helpers import WORKER, worker_args

pytestmark = pytest.mark.distributed
TIMEOUT_S = 10
# start-up of two ranks (imports, process group, data) plus the steps before the fault, on a busy 2-core machine
STARTUP_S = 90
RUN = ["parallel.dp=2", "parallel.zero_stage=3", f"parallel.timeout_s={TIMEOUT_S}", "train.max_steps=4",
       "eval.every_steps=2", "checkpoint.every_steps=0"]


@pytest.mark.parametrize("fault, operation", [("stall:3:1", "training step 3"),
                                              # rank 0 waits in the evaluation rank 1 skipped, rank 1 in step 3:
                                              # whichever times out first reports
                                              ("skip-eval:1", "(evaluation at step 2|training step 3)")])
def test_a_stalled_or_diverging_rank_ends_the_job_within_the_timeout(tmp_path, fault, operation):
    start = time.monotonic()
    with pytest.raises(DistributedRunError) as failure:
        run_distributed(WORKER, 2, worker_args(tmp_path, *RUN, faults=[fault], dp=2),
                        timeout_s=STARTUP_S + 10 * TIMEOUT_S)
    elapsed = time.monotonic() - start
    message = str(failure.value)
    assert "timed out after" not in message, message  # the job ended itself; run_distributed did not kill it
    assert re.search(r"exited with code (124|2)", message), message
    errors = [line for line in message.splitlines() if line.startswith("collie: error:")]
    assert len(errors) == 1, message
    assert re.search(rf"rank [01] .*(in|during) {operation}\b", errors[0]), errors[0]
    assert elapsed < STARTUP_S + 2 * TIMEOUT_S, elapsed
