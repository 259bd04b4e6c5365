from vdistream.cli import main

raise SystemExit(main())
