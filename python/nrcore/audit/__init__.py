"""Finding the mislabelled examples of a training set from one finished run: `nrcore audit`.

    from nrcore.audit import score_run, load_audit
    ranked = score_run("runs/fbr-cifar10n-cpu-worst-seed0")      # numpy arrays, most suspect first
    audit = load_audit("runs/...")                                 # every signal, metrics, export

Every finished run saves per-example signals in RUN_DIR/audit.npz (nrcore.train.dynamics); the
audit ranks the training examples by one of them and reads nothing but the run directory.
"""

from nrcore.audit.core import AuditError, RunAudit, Signal, average_precision, load_audit, score_run

__all__ = ["AuditError", "RunAudit", "Signal", "average_precision", "load_audit", "score_run"]
