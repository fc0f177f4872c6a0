-- Run once by the postgres image on first start (docker-compose.yml mounts it): one database per service.
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
