"""Where a capture device is: the location *kind* a registration states, normalised and classified.

The location *class* (PUBLIC_PLACE / RESTRICTED_AREA / PRIVATE_SPACE) is an explicit enum chosen
at registration. The free-text kind is only a hint that can force PRIVATE_SPACE, so it must not
be spellable around: it is normalised (NFKC, case-folded, zero-width characters dropped, spaces /
NBSP / ``-`` / ``.`` / ``/`` turned into ``_``; :func:`~engine.service.validation.normalise_label`)
and compared with its separators removed too, so "hotel room", "Hotel-Room", "hotel\u00a0room",
"hotel\u200broom", fullwidth "ｈｏｔｅｌ＿ｒｏｏｍ" and "hotelroom" are one kind.

* :data:`PRIVATE_KINDS` (with synonyms and plurals) are private spaces whatever class is declared;
* a kind of a private-sounding family (:data:`PRIVATE_STEMS`, :data:`PRIVATE_WORDS`, e.g. "hotel_annex",
  "shower_block")
  that is not in the list is *refused* unless the device is declared PRIVATE_SPACE: an unknown
  spelling is never silently allowed;
* anything else must still be a short label of letters and digits (no names, no sentences).
"""
from __future__ import annotations

from .status import BadRequest
from .validation import normalise_label

#: private spaces (compared without separators: "changing_rooms" -> "changingrooms")
PRIVATE_KINDS = frozenset({
    "hotelroom", "hotelrooms", "hotelsuite", "guestroom", "guestrooms", "bedroom", "bedrooms", "bed", "dormitory",
    "dormitories", "dorm", "dorms", "sleepingroom", "sleepingquarters", "bath", "baths", "bathroom", "bathrooms",
    "bathhouse", "shower", "showers", "showerroom", "showerrooms", "changingroom", "changingrooms", "changing",
    "fittingroom", "fittingrooms", "lockerroom", "lockerrooms", "dressingroom", "dressingrooms", "toilet", "toilets",
    "restroom", "restrooms", "lavatory", "lavatories", "wc", "wcs", "washroom", "washrooms", "loo", "loos", "latrine",
    "privy", "urinal", "urinals", "powderroom", "sauna", "saunas", "steamroom", "steamrooms", "spa", "massageroom",
    "nursingroom", "lactationroom", "breastfeedingroom", "mothersroom", "medicalexamroom", "examroom",
    "patientroom", "ward", "cell", "prisoncell", "interviewroom", "confessional", "prayerroom"})

#: stems of private-space families (compared without separators) and whole words of one
PRIVATE_STEMS = ("hotel", "dormitor", "sleeping", "bathroom", "bathhouse", "shower", "changing", "fitting", "locker",
                 "dressing", "toilet", "restroom", "lavator", "washroom", "latrine", "privy", "urinal", "powderroom",
                 "sauna", "steamroom", "massage", "nursing", "lactation", "breastfeed", "undress", "nude", "bedroom",
                 "guestroom", "patientroom", "examroom", "prisoncell")
PRIVATE_WORDS = frozenset({"spa", "wc", "bed", "beds", "loo", "bath", "baths", "dorm", "cell", "ward"})
#: public kinds that contain a private stem (a hotel lobby is a public place)
PUBLIC_KINDS = frozenset({"hotellobby", "hotelentrance", "hotelreception", "hoteldriveway", "hotelcarpark"})


def normalise_kind(kind: str) -> str:
    """The stored form of a location kind ("" when none is stated); ``BAD_LOCATION_KIND`` for text
    that is not a short label."""
    try:
        return normalise_label(kind or "", 48)
    except BadRequest:
        raise BadRequest("location_kind must be a short label like 'lobby' or 'staff_entrance' "
                         "(letters, digits, separators; no names)", reason="BAD_LOCATION_KIND") from None


def is_private_kind(label: str) -> bool:
    """True when the normalised ``label`` names a private space."""
    return label.replace("_", "") in PRIVATE_KINDS


def is_private_family(label: str) -> bool:
    """True when ``label`` sounds like a private space (one of :data:`PRIVATE_STEMS`)."""
    flat = label.replace("_", "")
    if flat in PUBLIC_KINDS:
        return False
    return any(stem in flat for stem in PRIVATE_STEMS) or any(w in PRIVATE_WORDS for w in label.split("_"))
