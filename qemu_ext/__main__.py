from qemu_ext.cli import main

raise SystemExit(main())
