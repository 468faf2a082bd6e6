/usr/bin/fio --version
