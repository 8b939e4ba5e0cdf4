"""Reference consumers (`proctor consume ...`): receive, verify, deduplicate by event_id, print."""
