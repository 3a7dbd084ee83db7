"""The on-device runtime: EdgeAgent (sync and asyncio), link monitor, local fallback."""
