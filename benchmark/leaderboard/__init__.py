"""Leaderboards: entries as data files (``schema``), ranked (``ranking``) and rendered (``markdown``,
``html``, ``publish``); every entry measured by the benchmark itself through a versioned protocol
(``protocol``, ``build``, ``submit``, ``verify``), submitted code run in a sandboxed process
(``sandbox``, ``sandbox_worker``), the built-in defenses seeded by ``builtin_entries``."""
