"""The gateway's hot path (key lookups, job reads, submissions) keeps a fixed pool of SEPEN_DB_POOL_SIZE database
connections: a burst of concurrent requests waits for them and never opens (and closes) connections of its own."""

from concurrent.futures import ThreadPoolExecutor

from fastapi.testclient import TestClient
from sqlalchemy import event

from service.app import create_app
from service.deps import autocommit_engine

POOL = 2
REQUESTS = 48


def test_a_burst_of_requests_shares_the_fixed_pool(service_settings, auth):
    app = create_app(service_settings.with_(db_pool_size=POOL))
    with TestClient(app) as client:
        answer = client.post("/generate", json={"prompt": "a cat and a dog"}, headers=auth)
        assert answer.status_code == 202
        job_url = answer.json()["links"]["self"]
        engine = autocommit_engine(app)
        opened = []
        event.listen(engine.pool, "connect", lambda *_: opened.append(1))

        def one(i: int) -> int:
            if i % 4 == 0:
                return client.post("/generate", json={"prompt": f"cat {i} and dog"}, headers=auth).status_code
            return client.get(job_url, headers=auth).status_code

        with ThreadPoolExecutor(16) as threads:
            statuses = list(threads.map(one, range(REQUESTS)))
        assert statuses.count(202) == REQUESTS // 4 and statuses.count(200) == REQUESTS - REQUESTS // 4
        # At most the one connection the first request had not needed yet; the default pool of old (5 kept, 10 more
        # opened while busy) opened and closed one per request beyond 5 at once.
        assert len(opened) <= POOL - 1
        assert engine.pool.size() == POOL and engine.pool.overflow() <= 0
