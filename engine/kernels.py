"""TEMPORARY: re-exports the numpy reference until the native kernels land."""
from .reference import *  # noqa: F401,F403
from .reference import sign_pack, group_argmax, hamming_distances, iom_counts, ip_int8, ip_f32, hamming_topk, iom_topk, ip_topk_int8, ip_topk_f32  # noqa: F401
