from heartbeat_registry.hbreg.cli import main

raise SystemExit(main())
