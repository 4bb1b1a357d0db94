"""Edge mode: the engine embedded on the capture device (the default single-site deployment).

* :class:`EdgeDevice` -- the same store, gallery index, use cases and audit chain as the
  matcher, in process on the device (:mod:`.device`); face information never leaves it.
* :mod:`.uplink` -- signed oversight bundles for the operator's central service (audit entries,
  consent / withdrawal events, decisions, counts; no face information) and their delivery.
* :mod:`.keystore` -- the device's own master secret and oversight signing key.
"""
from .device import EdgeDevice
from .uplink import Uplink, deliver, new_bundles

__all__ = ["EdgeDevice", "Uplink", "deliver", "new_bundles"]
