from kling_exporter.cli import main

raise SystemExit(main())
