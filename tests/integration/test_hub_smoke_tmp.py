from tests.integration.hubkit import open_client, running_hub, stream_token


async def test_one_event(db, fresh_dsn, alice):
    async with running_hub(fresh_dsn) as hub:
        token = await stream_token(db, alice.id)
        c = await open_client(hub.url, token)
        sub = await c.subscribe()
        print(sub)
        s = await db.sessions.create_session(alice.id, session_id="s-1", vision="v", working_directory="/w", git_branch="main")
        ev = (await c.events(1))[0]
        print(ev)
        assert ev["session_id"] == str(s.id)
        await db.sessions.update_progress(alice.id, "s-1", iterations=2)
        ev = (await c.events(1))[0]
        print(ev, hub.service.listener.notifications)
        await c.close()
