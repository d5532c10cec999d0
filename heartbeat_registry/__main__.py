from heartbeat_registry.cli import main

raise SystemExit(main())
