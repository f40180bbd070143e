"""The eBPF staging tracer, one job per module (issue 10 item 7):

- ``defs``: the one definition of probe ids, site kinds, drop reasons and vectors shared with the C
- ``loader``: environment checks (BCC, root, tracefs, headers/kheaders) and the compile
- ``attach``: uprobes once per library file, for every process
- ``governor``: the CPU budget and each probe group's duty cycle
- ``idents``: process labels (comm, Kubernetes pod) of traced tgids
- ``selfcost``: bpf_stats run time and trap costs calibrated on the node
- ``source``: the Source that wires them and folds the maps into labelled counters
"""

from .loader import REQUIRED_TRACEPOINTS
from .source import DEFAULT_BUDGET, EbpfSource, program_dir

__all__ = ["DEFAULT_BUDGET", "REQUIRED_TRACEPOINTS", "EbpfSource", "program_dir"]
