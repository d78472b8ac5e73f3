"""The ground floor: definitions every other package stands on; imports nothing of the project.

Typed settings (:mod:`.settings` + ``profiles/``), data contracts (:mod:`.contracts`), the one
feature definition (:mod:`.features`), domain errors (:mod:`.errors`), atomic writes
(:mod:`.atomic`), keyed pseudonyms (:mod:`.privacy`), console logging (:mod:`.logs`) and the
only module that knows Feast's online key/field/serialization layout (:mod:`.online_layout`).
No module here opens a connection or starts a process.
"""
