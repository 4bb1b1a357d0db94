"""One module per study; each returns a dataclass (see :mod:`engine.evaluation.records`).

* :mod:`.accuracy` -- EER / FNMR at FMR targets, normal and stolen-token scenarios (ISO/IEC 19795-1)
* :mod:`.folds` -- LFW's 10-fold accuracy for pairs files with folds
* :mod:`.unlinkability` -- D_sys with null calibrations (Gomez-Barrero et al. 2018)
* :mod:`.irreversibility` -- inversion attacks under full disclosure
* :mod:`.renewability` -- old template vs re-keyed enrolment
* :mod:`.encrypted` -- accuracy of an encrypted (HE) scheme from decrypted scores
"""
