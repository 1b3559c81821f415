-- Read by pgspot before the install script (test_install_script.py): CREATE EXTENSION
-- creates the schema named in pg_queue.control before it runs the script.
CREATE SCHEMA queue;
