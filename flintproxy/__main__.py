from flintproxy.cli import main

raise SystemExit(main())
