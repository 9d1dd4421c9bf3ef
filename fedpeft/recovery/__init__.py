"""Recovery: checkpoints a run resumes from to the bit (:mod:`.checkpoint`), the crash points
that test it (:mod:`.crash`) and the client failures injected on purpose (:mod:`.faults`)."""

#: The file of a results folder that a run resumes from (written by :mod:`.checkpoint`;
#: the crash drill of :mod:`.crash` resumes a run that has one).  Here, not in either
#: module, so that neither imports the other.
CHECKPOINT_FILE = "checkpoint.bin"
