-- Databases of the services profile (services.sh creates the same ones on this machine).
CREATE DATABASE recsys_mlflow;
CREATE DATABASE recsys_prefect;
CREATE DATABASE recsys_feast;
