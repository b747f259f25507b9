-- one database per rmflow service (infra/team.py SERVICE_DATABASES); the container's POSTGRES_USER owns them
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
CREATE DATABASE labelstudio;
