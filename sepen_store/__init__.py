"""sepen_store: the persistence layer shared by the gateway and the workers.

Tables and sessions (`tables`, `database`), the job state machine (`jobs`), the adapter registry
with immutable versions (`registry`), blobs in the database so any machine can read them
(`blobs`), API keys (`auth`), the queue contract (`queue`) and settings (`settings`).
Never imports torch or fastapi.
"""
