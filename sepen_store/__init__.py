"""sepen_store: the persistence layer shared by the gateway and the workers.

Tables and sessions (`tables`, `database`), the job state machine (`jobs`), the adapter registry
with immutable versions (`registry`), blobs any machine can read, in the database or an S3-compatible bucket
(`blobs`, `object_store`, `retention`), API keys (`auth`), the queue contract (`queue`) and settings (`settings`).
Never imports torch or fastapi.
"""
