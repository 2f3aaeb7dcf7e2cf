"""The DRSL training pipeline (docs/method.md §4-§6, §9): configs, source training,
class-balanced pseudo-label rounds, DRSL/DRSL+ adaptation and evaluation,
driven by the ``drsl`` command line (:mod:`drsl_fast.cli`)."""
