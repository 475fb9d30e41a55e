from qemu_ext._entry import main

raise SystemExit(main())
