from keen_stream.cli import main

raise SystemExit(main())
